//! Regional parameters of EU868 and US915 for class A devices: data rates,
//! the RX1 and RX2 receive windows, their delays and the largest
//! FRMPayload per downlink data rate.
//!
//! Only the defaults a device has after a join are modelled: RX1DROffset 0,
//! RX2 on the region's default frequency and data rate, RX1 one second
//! after the uplink. The server sends no MAC commands that change them.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Delay from the end of an uplink to the RX1 window of a data downlink.
pub const RECEIVE_DELAY1: Duration = Duration::from_secs(1);
/// Delay to the RX2 window of a data downlink.
pub const RECEIVE_DELAY2: Duration = Duration::from_secs(2);
/// Delay from the end of a join request to RX1 of the join accept.
pub const JOIN_ACCEPT_DELAY1: Duration = Duration::from_secs(5);
/// Delay to RX2 of the join accept.
pub const JOIN_ACCEPT_DELAY2: Duration = Duration::from_secs(6);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    #[error(
        "invalid LoRa data rate {0:?}: expected SF7 to SF12 and BW125, BW250 or BW500, such as SF7BW125"
    )]
    InvalidDataRate(String),
    #[error("{region} has no uplink data rate {data_rate}")]
    UnknownUplinkDataRate { region: Region, data_rate: DataRate },
    #[error("{frequency_hz} Hz is not an uplink channel of {region}")]
    UnknownChannel { region: Region, frequency_hz: u32 },
    #[error("{region} has no data rate DR{index}")]
    UnknownDataRateIndex { region: Region, index: u8 },
}

/// A LoRa data rate: spreading factor and bandwidth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DataRate {
    pub spreading_factor: u8,
    pub bandwidth_khz: u16,
}

impl DataRate {
    pub const fn new(spreading_factor: u8, bandwidth_khz: u16) -> Self {
        Self {
            spreading_factor,
            bandwidth_khz,
        }
    }
}

/// Formats the data rate as the Semtech protocol writes it, `SF7BW125`.
impl fmt::Display for DataRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SF{}BW{}", self.spreading_factor, self.bandwidth_khz)
    }
}

impl FromStr for DataRate {
    type Err = RegionError;

    /// Parses `SF<7..12>BW<125|250|500>`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let invalid = || RegionError::InvalidDataRate(text.to_owned());
        let rest = text.strip_prefix("SF").ok_or_else(invalid)?;
        let (spreading_factor, bandwidth) = rest.split_once("BW").ok_or_else(invalid)?;
        let spreading_factor: u8 = spreading_factor.parse().map_err(|_| invalid())?;
        let bandwidth_khz: u16 = bandwidth.parse().map_err(|_| invalid())?;
        if !(7..=12).contains(&spreading_factor) || ![125, 250, 500].contains(&bandwidth_khz) {
            return Err(invalid());
        }
        Ok(Self::new(spreading_factor, bandwidth_khz))
    }
}

/// A receive window: where and how the gateway transmits a downlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub frequency_hz: u32,
    /// Index of the data rate in the region's table (DRn).
    pub data_rate_index: u8,
    pub data_rate: DataRate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Region {
    Eu868,
    Us915,
}

/// EU868 data rates DR0 to DR6 (DR7 is FSK, which this crate does not
/// handle). Uplinks and downlinks share the table.
const EU868_DATA_RATES: [DataRate; 7] = [
    DataRate::new(12, 125),
    DataRate::new(11, 125),
    DataRate::new(10, 125),
    DataRate::new(9, 125),
    DataRate::new(8, 125),
    DataRate::new(7, 125),
    DataRate::new(7, 250),
];

/// US915 uplink data rates DR0 to DR4.
const US915_UPLINK_DATA_RATES: [DataRate; 5] = [
    DataRate::new(10, 125),
    DataRate::new(9, 125),
    DataRate::new(8, 125),
    DataRate::new(7, 125),
    DataRate::new(8, 500),
];

/// US915 downlink data rates DR8 to DR13.
const US915_DOWNLINK_DATA_RATES: [DataRate; 6] = [
    DataRate::new(12, 500),
    DataRate::new(11, 500),
    DataRate::new(10, 500),
    DataRate::new(9, 500),
    DataRate::new(8, 500),
    DataRate::new(7, 500),
];

/// US915 RX1 downlink data rate by uplink data rate (rows DR0 to DR4) and
/// RX1DROffset (columns 0 to 3).
const US915_RX1_DATA_RATES: [[u8; 4]; 5] = [
    [10, 9, 8, 8],
    [11, 10, 9, 8],
    [12, 11, 10, 9],
    [13, 12, 11, 10],
    [13, 13, 12, 11],
];

impl Region {
    pub fn name(self) -> &'static str {
        match self {
            Region::Eu868 => "EU868",
            Region::Us915 => "US915",
        }
    }

    /// Returns the uplink data rate index (DRn) of a LoRa data rate.
    pub fn uplink_data_rate_index(self, data_rate: DataRate) -> Result<u8, RegionError> {
        let table: &[DataRate] = match self {
            Region::Eu868 => &EU868_DATA_RATES,
            Region::Us915 => &US915_UPLINK_DATA_RATES,
        };
        table
            .iter()
            .position(|known| *known == data_rate)
            .map(|index| index as u8)
            .ok_or(RegionError::UnknownUplinkDataRate {
                region: self,
                data_rate,
            })
    }

    /// Returns the LoRa data rate of a downlink data rate index.
    pub fn downlink_data_rate(self, index: u8) -> Result<DataRate, RegionError> {
        let found = match self {
            Region::Eu868 => EU868_DATA_RATES.get(usize::from(index)),
            Region::Us915 => index
                .checked_sub(8)
                .and_then(|offset| US915_DOWNLINK_DATA_RATES.get(usize::from(offset))),
        };
        found.copied().ok_or(RegionError::UnknownDataRateIndex {
            region: self,
            index,
        })
    }

    /// Returns the RX1 window for an uplink on `frequency_hz` at data rate
    /// `uplink_index`, with RX1DROffset `dr_offset`.
    ///
    /// EU868 sends RX1 on the uplink frequency at the uplink data rate minus
    /// the offset. US915 sends it on downlink channel `uplink channel mod 8`
    /// (923.3 MHz + 600 kHz steps) at the data rate of its RX1 table.
    pub fn rx1_window(
        self,
        frequency_hz: u32,
        uplink_index: u8,
        dr_offset: u8,
    ) -> Result<Window, RegionError> {
        let (frequency_hz, data_rate_index) = match self {
            Region::Eu868 => {
                if usize::from(uplink_index) >= EU868_DATA_RATES.len() {
                    return Err(RegionError::UnknownDataRateIndex {
                        region: self,
                        index: uplink_index,
                    });
                }
                (frequency_hz, uplink_index.saturating_sub(dr_offset.min(5)))
            }
            Region::Us915 => {
                let row = US915_RX1_DATA_RATES.get(usize::from(uplink_index)).ok_or(
                    RegionError::UnknownDataRateIndex {
                        region: self,
                        index: uplink_index,
                    },
                )?;
                let channel =
                    us915_uplink_channel(frequency_hz).ok_or(RegionError::UnknownChannel {
                        region: self,
                        frequency_hz,
                    })?;
                let downlink_hz = 923_300_000 + 600_000 * (channel % 8);
                (downlink_hz, row[usize::from(dr_offset.min(3))])
            }
        };
        Ok(Window {
            frequency_hz,
            data_rate_index,
            data_rate: self.downlink_data_rate(data_rate_index)?,
        })
    }

    /// Returns the default RX2 window: EU868 869.525 MHz DR0 (SF12BW125),
    /// US915 923.3 MHz DR8 (SF12BW500).
    pub fn rx2_window(self) -> Window {
        let (frequency_hz, data_rate_index) = match self {
            Region::Eu868 => (869_525_000, 0),
            Region::Us915 => (923_300_000, 8),
        };
        Window {
            frequency_hz,
            data_rate_index,
            data_rate: self
                .downlink_data_rate(data_rate_index)
                .expect("the default RX2 data rate is in the table"),
        }
    }

    /// Returns the RX2 data rate index that join accepts announce in
    /// DLSettings.
    pub fn rx2_data_rate_index(self) -> u8 {
        self.rx2_window().data_rate_index
    }

    /// Returns the largest FRMPayload (N, without FOpts) a downlink at data
    /// rate `index` can carry, for devices without a dwell time limit.
    pub fn max_frm_payload_bytes(self, index: u8) -> Result<usize, RegionError> {
        let size = match (self, index) {
            (Region::Eu868, 0..=2) => 51,
            (Region::Eu868, 3) => 115,
            (Region::Eu868, 4..=6) => 222,
            (Region::Us915, 8) => 33,
            (Region::Us915, 9) => 109,
            (Region::Us915, 10..=13) => 222,
            _ => {
                return Err(RegionError::UnknownDataRateIndex {
                    region: self,
                    index,
                });
            }
        };
        Ok(size)
    }

    /// Returns the transmit power in dBm that downlinks ask the gateway for.
    ///
    /// NOTE: fixed values below the regional limits (EU868 14 dBm, US915
    /// 20 dBm); the gateway's antenna gain is not taken into account.
    pub fn downlink_tx_power_dbm(self) -> u8 {
        match self {
            Region::Eu868 => 14,
            Region::Us915 => 20,
        }
    }
}

/// Returns the US915 uplink channel (0 to 71) of a frequency. Channels 0
/// to 63 are 125 kHz wide from 902.3 MHz in 200 kHz steps. Channels 64 to
/// 71 are 500 kHz wide from 903.0 MHz in 1.6 MHz steps.
fn us915_uplink_channel(frequency_hz: u32) -> Option<u32> {
    if let Some(offset) = frequency_hz.checked_sub(902_300_000)
        && offset % 200_000 == 0
        && offset / 200_000 < 64
    {
        return Some(offset / 200_000);
    }
    if let Some(offset) = frequency_hz.checked_sub(903_000_000)
        && offset % 1_600_000 == 0
        && offset / 1_600_000 < 8
    {
        return Some(64 + offset / 1_600_000);
    }
    None
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Region {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "EU868" => Ok(Region::Eu868),
            "US915" => Ok(Region::Us915),
            other => Err(format!("invalid region {other:?}: expected EU868 or US915")),
        }
    }
}

/// Converts a frequency in MHz, as the Semtech protocol writes it, to Hz.
pub fn mhz_to_hz(mhz: f64) -> Option<u32> {
    let hz = (mhz * 1_000_000.0).round();
    (hz.is_finite() && hz > 0.0 && hz <= f64::from(u32::MAX)).then_some(hz as u32)
}

/// Converts a frequency in Hz to MHz for the Semtech protocol.
pub fn hz_to_mhz(hz: u32) -> f64 {
    f64::from(hz) / 1_000_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_rate_strings_round_trip() {
        let data_rate: DataRate = "SF7BW125".parse().unwrap();
        assert_eq!(data_rate, DataRate::new(7, 125));
        assert_eq!(data_rate.to_string(), "SF7BW125");
        for bad in ["SF6BW125", "SF7BW100", "sf7bw125", "SF7", "", "SF12BW125x"] {
            assert!(bad.parse::<DataRate>().is_err(), "{bad}");
        }
    }

    #[test]
    fn eu868_rx1_uses_uplink_frequency_and_data_rate() {
        let uplink = Region::Eu868
            .uplink_data_rate_index(DataRate::new(9, 125))
            .unwrap();
        assert_eq!(uplink, 3);
        let window = Region::Eu868.rx1_window(868_100_000, uplink, 0).unwrap();
        assert_eq!(window.frequency_hz, 868_100_000);
        assert_eq!(window.data_rate_index, 3);
        assert_eq!(window.data_rate, DataRate::new(9, 125));
        let offset = Region::Eu868.rx1_window(868_100_000, 1, 3).unwrap();
        assert_eq!(offset.data_rate_index, 0);
    }

    #[test]
    fn us915_rx1_maps_channel_and_data_rate() {
        // Uplink channel 9 (904.1 MHz) at DR2 gets RX1 on channel 1 at DR12.
        let window = Region::Us915.rx1_window(904_100_000, 2, 0).unwrap();
        assert_eq!(window.frequency_hz, 923_900_000);
        assert_eq!(window.data_rate_index, 12);
        assert_eq!(window.data_rate, DataRate::new(8, 500));
        // The 500 kHz channel 65 (904.6 MHz) at DR4 gets RX1 on channel 1.
        let wide = Region::Us915.rx1_window(904_600_000, 4, 0).unwrap();
        assert_eq!(wide.frequency_hz, 923_900_000);
        assert_eq!(wide.data_rate_index, 13);
        assert!(Region::Us915.rx1_window(904_150_000, 2, 0).is_err());
        assert!(Region::Us915.rx1_window(904_100_000, 5, 0).is_err());
    }

    #[test]
    fn rx2_defaults() {
        let eu = Region::Eu868.rx2_window();
        assert_eq!(eu.frequency_hz, 869_525_000);
        assert_eq!(eu.data_rate, DataRate::new(12, 125));
        let us = Region::Us915.rx2_window();
        assert_eq!(us.frequency_hz, 923_300_000);
        assert_eq!(us.data_rate_index, 8);
        assert_eq!(us.data_rate, DataRate::new(12, 500));
    }

    #[test]
    fn unknown_data_rates_are_errors() {
        assert!(
            Region::Us915
                .uplink_data_rate_index(DataRate::new(12, 125))
                .is_err()
        );
        assert!(Region::Eu868.downlink_data_rate(7).is_err());
        assert!(Region::Us915.downlink_data_rate(7).is_err());
        assert!(Region::Us915.max_frm_payload_bytes(0).is_err());
        assert_eq!(Region::Eu868.max_frm_payload_bytes(0), Ok(51));
        assert_eq!(Region::Us915.max_frm_payload_bytes(8), Ok(33));
    }

    #[test]
    fn frequencies_convert_between_mhz_and_hz() {
        assert_eq!(mhz_to_hz(868.1), Some(868_100_000));
        assert_eq!(mhz_to_hz(869.525), Some(869_525_000));
        assert_eq!(mhz_to_hz(-1.0), None);
        assert_eq!(mhz_to_hz(f64::NAN), None);
        assert_eq!(hz_to_mhz(923_300_000), 923.3);
    }
}
