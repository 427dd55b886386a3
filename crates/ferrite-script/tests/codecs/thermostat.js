// Test formatter for an imagined radiator thermostat with downlink
// commands, written for this crate in the style of the device repository.
//
// Uplink on fPort 1: byte 0 setpoint in 0.5 °C, byte 1 valve opening in %.
// Downlink on fPort 10:
//   0x01 SS    set the setpoint to SS * 0.5 °C (5.0 to 30.0 °C)
//   0x02 HH LL set the report interval in minutes (1 to 1440)
//   0xFF       reboot

function decodeUplink(input) {
  return {
    data: {
      setpoint: input.bytes[0] / 2,
      valve: input.bytes[1]
    }
  };
}

function encodeDownlink(input) {
  var data = input.data;
  if (typeof data.setpoint === 'number') {
    if (data.setpoint < 5 || data.setpoint > 30) {
      return { errors: ['setpoint must be between 5 and 30 °C'] };
    }
    return { bytes: [0x01, Math.round(data.setpoint * 2)], fPort: 10 };
  }
  if (typeof data.intervalMinutes === 'number') {
    var minutes = data.intervalMinutes;
    var warnings = [];
    if (minutes < 1 || minutes > 1440) {
      minutes = Math.min(1440, Math.max(1, minutes));
      warnings.push('interval clamped to ' + minutes + ' minutes');
    }
    return { bytes: [0x02, (minutes >> 8) & 0xff, minutes & 0xff], fPort: 10, warnings: warnings };
  }
  if (data.reboot === true) {
    return { bytes: new Uint8Array([0xff]), fPort: 10 };
  }
  return { errors: ['unknown command; expected setpoint, intervalMinutes or reboot'] };
}

function decodeDownlink(input) {
  var b = input.bytes;
  switch (b[0]) {
    case 0x01:
      return { data: { setpoint: b[1] / 2 } };
    case 0x02:
      return { data: { intervalMinutes: (b[1] << 8) | b[2] } };
    case 0xff:
      return { data: { reboot: true } };
    default:
      return { errors: ['unknown command 0x' + b[0].toString(16)] };
  }
}
