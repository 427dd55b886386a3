// Test formatter for an imagined asset tracker with one message type per
// fPort, written for this crate in the style of the device repository.
//
// fPort 1, status:   byte 0 battery in 20 mV steps above 2.0 V,
//                    byte 1 flags (bit 0 moving, bit 1 button pressed)
// fPort 2, position: int32 BE latitude and longitude in 1e-7 degrees,
//                    int16 BE altitude in metres
// fPort 3, counters: two uint32 little-endian counters

var PORT_NAMES = { 1: 'status', 2: 'position', 3: 'counters' };

function int32BE(b, i) {
  return (b[i] << 24) | (b[i + 1] << 16) | (b[i + 2] << 8) | b[i + 3];
}

function uint32LE(b, i) {
  return (b[i] | (b[i + 1] << 8) | (b[i + 2] << 16)) + b[i + 3] * 0x1000000;
}

function decodeUplink(input) {
  var b = input.bytes;
  var data = { type: PORT_NAMES[input.fPort] };

  switch (input.fPort) {
    case 1:
      data.batteryVoltage = Math.round((2 + b[0] * 0.02) * 100) / 100;
      data.moving = (b[1] & 0x01) === 0x01;
      data.buttonPressed = (b[1] & 0x02) === 0x02;
      break;
    case 2:
      data.latitude = int32BE(b, 0) / 1e7;
      data.longitude = int32BE(b, 4) / 1e7;
      var altitude = (b[8] << 8) | b[9];
      data.altitude = altitude & 0x8000 ? altitude - 0x10000 : altitude;
      break;
    case 3:
      data.counters = [uint32LE(b, 0), uint32LE(b, 4)];
      break;
    default:
      return { errors: ['unknown fPort ' + input.fPort] };
  }

  return { data: data };
}
