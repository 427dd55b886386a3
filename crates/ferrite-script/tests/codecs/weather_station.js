// Test formatter for an imagined weather station, written for this crate in
// the style of the device repository. It exercises helper functions,
// closures, typed arrays, String.fromCharCode, JSON, Date and warnings.
//
// Uplink on fPort 5:
//   bytes 0-3    station name, 4 ASCII characters
//   bytes 4-7    air pressure, float32 big-endian, hPa
//   bytes 8-9    wind speed, unsigned 16-bit big-endian, 0.01 m/s
//   byte  10     wind direction, 0-15 in steps of 22.5 degrees
//   byte  11     age of the measurement in seconds
//   byte  12     battery, 0-100 %

var DIRECTIONS = ['N', 'NNE', 'NE', 'ENE', 'E', 'ESE', 'SE', 'SSE',
                  'S', 'SSW', 'SW', 'WSW', 'W', 'WNW', 'NW', 'NNW'];

function reader(bytes) {
  var offset = 0;
  var view = new DataView(new Uint8Array(bytes).buffer);
  return {
    ascii: function (length) {
      var text = '';
      for (var i = 0; i < length; i++) {
        text += String.fromCharCode(bytes[offset + i]);
      }
      offset += length;
      return text;
    },
    float32: function () {
      var value = view.getFloat32(offset, false);
      offset += 4;
      return value;
    },
    uint16: function () {
      var value = view.getUint16(offset, false);
      offset += 2;
      return value;
    },
    uint8: function () {
      return bytes[offset++];
    }
  };
}

function round(value, decimals) {
  var factor = Math.pow(10, decimals);
  return Math.round(value * factor) / factor;
}

function decodeUplink(input) {
  if (input.bytes.length < 13) {
    return { errors: ['payload too short: ' + input.bytes.length + ' bytes, expected 13'] };
  }

  var read = reader(input.bytes);
  var warnings = [];
  var station = read.ascii(4);
  var pressure = round(read.float32(), 1);
  var windSpeed = read.uint16() / 100;
  var direction = DIRECTIONS[read.uint8() & 0x0f];
  var age = read.uint8();
  var battery = read.uint8();

  if (battery < 20) {
    warnings.push('battery low: ' + battery + ' %');
  }
  var measuredAt = new Date(input.recvTime.getTime() - age * 1000);

  // Round trip through JSON, as some formatters do to copy objects.
  var wind = JSON.parse(JSON.stringify({ speed: windSpeed, direction: direction }));

  return {
    data: {
      station: station,
      pressure: pressure,
      wind: wind,
      battery: battery,
      measuredAt: measuredAt.toISOString()
    },
    warnings: warnings
  };
}
