// Test formatter for an imagined room sensor, written for this crate in the
// style of The Things Stack device repository.
//
// Uplink on fPort 1, 5 bytes:
//   bytes 0-1  temperature, signed 16-bit big-endian, 0.01 °C
//   bytes 2-3  relative humidity, unsigned 16-bit big-endian, 0.1 %
//   byte  4    battery, 0-100 %

function readInt16BE(bytes, offset) {
  var value = (bytes[offset] << 8) | bytes[offset + 1];
  return value > 0x7fff ? value - 0x10000 : value;
}

function readUint16BE(bytes, offset) {
  return (bytes[offset] << 8) | bytes[offset + 1];
}

function decodeUplink(input) {
  if (input.fPort !== 1) {
    return { errors: ['unknown fPort ' + input.fPort] };
  }
  if (input.bytes.length !== 5) {
    return { errors: ['expected 5 bytes, got ' + input.bytes.length] };
  }

  var warnings = [];
  var humidity = readUint16BE(input.bytes, 2) / 10;
  if (humidity > 100) {
    warnings.push('humidity above 100 %: ' + humidity);
  }

  return {
    data: {
      temperature: readInt16BE(input.bytes, 0) / 100,
      humidity: humidity,
      battery: input.bytes[4]
    },
    warnings: warnings
  };
}
