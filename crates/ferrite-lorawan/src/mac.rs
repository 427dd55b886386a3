//! LoRaWAN 1.0.x frames on top of the `lorawan` crate, which does the AES
//! and CMAC work: parsing uplinks, checking MICs, decrypting FRMPayloads,
//! building join accepts with their session keys, and building downlinks.
//!
//! EUIs and DevAddrs are kept in the order people write them, most
//! significant byte first. The frames carry them little-endian, so this
//! module converts when it reads or writes a frame.
//!
//! The device side (join requests, uplinks, opening join accepts) is here
//! too, for simulated devices in tests and benchmarks.

use std::fmt;

use lorawan::creator::{DataPayloadCreator, JoinAcceptCreator, JoinRequestCreator};
use lorawan::default_crypto::DefaultFactory;
use lorawan::keys::{AES128, AppKey, AppSKey, NewSKey};
use lorawan::parser::{
    DataHeader, DataPayload, DevNonce, EncryptedDataPayload, EncryptedJoinAcceptPayload, FCtrl,
    FRMPayload, MHDR, MType, PhyPayload, parse,
};

/// An EUI-64 (DevEUI, JoinEUI, gateway EUI), most significant byte first.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Eui64(pub [u8; 8]);

impl Eui64 {
    fn from_wire(bytes: &[u8]) -> Self {
        let mut eui: [u8; 8] = bytes.try_into().expect("an EUI is 8 bytes");
        eui.reverse();
        Self(eui)
    }

    fn to_wire(self) -> [u8; 8] {
        let mut wire = self.0;
        wire.reverse();
        wire
    }
}

/// Formats the EUI as 16 lowercase hex digits.
impl fmt::Display for Eui64 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

impl fmt::Debug for Eui64 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Eui64({self})")
    }
}

/// A 32-bit device address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevAddr(pub u32);

impl DevAddr {
    fn from_wire(bytes: &[u8]) -> Self {
        Self(u32::from_le_bytes(
            bytes.try_into().expect("a DevAddr is 4 bytes"),
        ))
    }

    fn to_wire(self) -> [u8; 4] {
        self.0.to_le_bytes()
    }
}

/// Formats the address as 8 lowercase hex digits.
impl fmt::Display for DevAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

impl fmt::Debug for DevAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DevAddr({self})")
    }
}

/// An AES-128 key: AppKey, NwkSKey or AppSKey. `Debug` hides the value.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AesKey(pub [u8; 16]);

impl fmt::Debug for AesKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AesKey(..)")
    }
}

impl AesKey {
    fn aes128(self) -> AES128 {
        AES128(self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    #[error("the PHYPayload is {0} bytes, too short for any LoRaWAN frame")]
    TooShort(usize),
    #[error("the PHYPayload has LoRaWAN major version {0}; only LoRaWAN R1 (0) is supported")]
    UnsupportedMajor(u8),
    #[error("invalid {mtype} frame of {len} bytes: {reason}")]
    InvalidFrame {
        mtype: &'static str,
        len: usize,
        reason: &'static str,
    },
    #[error("the downlink cannot be built: {0}")]
    Build(String),
}

/// A frame received from a device, or a frame type the server does not
/// handle on uplink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uplink {
    JoinRequest(JoinRequest),
    Data(DataUp),
    /// A downlink, join accept or proprietary frame heard by a gateway.
    Ignored(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinRequest {
    pub join_eui: Eui64,
    pub dev_eui: Eui64,
    pub dev_nonce: u16,
    phy_payload: Vec<u8>,
}

impl JoinRequest {
    /// Checks the MIC with the device's AppKey.
    pub fn verify_mic(&self, app_key: AesKey) -> bool {
        lorawan::parser::JoinRequestPayload::new(&self.phy_payload[..])
            .map(|payload| payload.validate_mic(&app_key.aes128()))
            .unwrap_or(false)
    }
}

/// A data uplink (confirmed or unconfirmed), still encrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataUp {
    pub dev_addr: DevAddr,
    /// The 16 bits of FCntUp on the air; see [`crate::fcnt`].
    pub f_cnt: u16,
    pub confirmed: bool,
    pub adr: bool,
    /// The device acknowledges the last confirmed downlink.
    pub ack: bool,
    /// MAC commands in FOpts, in clear in LoRaWAN 1.0.
    pub f_opts: Vec<u8>,
    pub f_port: Option<u8>,
    phy_payload: Vec<u8>,
}

impl DataUp {
    fn encrypted(&self) -> EncryptedDataPayload<Vec<u8>, DefaultFactory> {
        EncryptedDataPayload::new(self.phy_payload.clone())
            .expect("the frame was checked when it was parsed")
    }

    /// Checks the MIC with the session's NwkSKey and the full 32-bit
    /// counter.
    pub fn verify_mic(&self, nwk_s_key: AesKey, f_cnt: u32) -> bool {
        self.encrypted().validate_mic(&nwk_s_key.aes128(), f_cnt)
    }

    /// Decrypts the FRMPayload: application data with the AppSKey, or MAC
    /// commands (FPort 0) with the NwkSKey. Returns an empty vector when
    /// the frame has no FRMPayload.
    pub fn decrypt_frm_payload(&self, nwk_s_key: AesKey, app_s_key: AesKey, f_cnt: u32) -> Vec<u8> {
        let nwk = nwk_s_key.aes128();
        let app = app_s_key.aes128();
        let decrypted = self
            .encrypted()
            .decrypt(Some(&nwk), Some(&app), f_cnt)
            .expect("both keys are given");
        match decrypted.frm_payload() {
            FRMPayload::Data(data) => data.to_vec(),
            FRMPayload::MACCommands(commands) => commands.data().to_vec(),
            FRMPayload::None => Vec::new(),
        }
    }
}

fn mtype_name(mtype: MType) -> &'static str {
    match mtype {
        MType::JoinRequest => "JoinRequest",
        MType::JoinAccept => "JoinAccept",
        MType::UnconfirmedDataUp => "UnconfirmedDataUp",
        MType::UnconfirmedDataDown => "UnconfirmedDataDown",
        MType::ConfirmedDataUp => "ConfirmedDataUp",
        MType::ConfirmedDataDown => "ConfirmedDataDown",
        MType::RFU => "RFU",
        MType::Proprietary => "Proprietary",
    }
}

/// Parses a PHYPayload received from a gateway.
pub fn parse_uplink(phy_payload: &[u8]) -> Result<Uplink, MacError> {
    let Some(&first) = phy_payload.first() else {
        return Err(MacError::TooShort(0));
    };
    let mtype = MHDR::new(first).mtype();
    let name = mtype_name(MHDR::new(first).mtype());
    if matches!(
        mtype,
        MType::JoinAccept | MType::UnconfirmedDataDown | MType::ConfirmedDataDown
    ) || matches!(mtype, MType::RFU | MType::Proprietary)
    {
        return Ok(Uplink::Ignored(name));
    }
    if first & 0x03 != 0 {
        return Err(MacError::UnsupportedMajor(first & 0x03));
    }

    let invalid = |reason| MacError::InvalidFrame {
        mtype: name,
        len: phy_payload.len(),
        reason,
    };
    let parsed = parse(phy_payload.to_vec()).map_err(|error| match error {
        lorawan::parser::Error::InvalidPayload => MacError::TooShort(phy_payload.len()),
        lorawan::parser::Error::InvalidData => {
            invalid("the length does not fit the frame type and its FOpts")
        }
        _ => invalid("the frame cannot be parsed"),
    })?;

    match parsed {
        PhyPayload::JoinRequest(request) => Ok(Uplink::JoinRequest(JoinRequest {
            join_eui: Eui64::from_wire(request.app_eui().as_ref()),
            dev_eui: Eui64::from_wire(request.dev_eui().as_ref()),
            dev_nonce: u16::from_le_bytes(
                request
                    .dev_nonce()
                    .as_ref()
                    .try_into()
                    .expect("a DevNonce is 2 bytes"),
            ),
            phy_payload: phy_payload.to_vec(),
        })),
        PhyPayload::Data(DataPayload::Encrypted(data)) => {
            let fhdr = data.fhdr();
            let fctrl = fhdr.fctrl();
            Ok(Uplink::Data(DataUp {
                dev_addr: DevAddr::from_wire(fhdr.dev_addr().as_ref()),
                f_cnt: fhdr.fcnt(),
                confirmed: data.is_confirmed(),
                adr: fctrl.adr(),
                ack: fctrl.ack(),
                f_opts: fhdr.data().to_vec(),
                f_port: data.f_port(),
                phy_payload: phy_payload.to_vec(),
            }))
        }
        PhyPayload::Data(DataPayload::Decrypted(_)) | PhyPayload::JoinAccept(_) => {
            Ok(Uplink::Ignored(name))
        }
    }
}

/// The session keys of a join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionKeys {
    pub nwk_s_key: AesKey,
    pub app_s_key: AesKey,
}

/// Fields of a join accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinAccept {
    /// AppNonce (JoinNonce), 24 bits.
    pub join_nonce: u32,
    /// NetID, 24 bits.
    pub net_id: u32,
    pub dev_addr: DevAddr,
    pub rx1_dr_offset: u8,
    pub rx2_data_rate: u8,
    /// RX1 delay in seconds (0 means 1).
    pub rx_delay: u8,
}

fn u24_wire(value: u32) -> [u8; 3] {
    let bytes = value.to_le_bytes();
    [bytes[0], bytes[1], bytes[2]]
}

/// Builds the encrypted join accept PHYPayload (17 bytes, no CFList) and
/// derives the session keys it gives the device:
/// `NwkSKey = aes128_encrypt(AppKey, 0x01 | AppNonce | NetID | DevNonce | pad)`
/// and the same with 0x02 for the AppSKey.
pub fn build_join_accept(
    accept: &JoinAccept,
    app_key: AesKey,
    dev_nonce: u16,
) -> (Vec<u8>, SessionKeys) {
    let mut creator = JoinAcceptCreator::with_options([0u8; 17], DefaultFactory)
        .expect("a 17-byte buffer fits a join accept");
    creator
        .set_app_nonce(&u24_wire(accept.join_nonce))
        .set_net_id(&u24_wire(accept.net_id))
        .set_dev_addr(&accept.dev_addr.to_wire())
        .set_dl_settings((accept.rx1_dr_offset & 0x07) << 4 | (accept.rx2_data_rate & 0x0f))
        .set_rx_delay(accept.rx_delay & 0x0f);
    let phy_payload = creator
        .build(&app_key.aes128())
        .expect("a 17-byte buffer fits a join accept")
        .to_vec();

    let keys = open_join_accept(&phy_payload, app_key, dev_nonce)
        .expect("a join accept built with this key opens with it")
        .1;
    (phy_payload, keys)
}

/// Decrypts a join accept as the device does, checks its MIC and derives
/// the session keys. Returns `None` when the MIC is wrong.
pub fn open_join_accept(
    phy_payload: &[u8],
    app_key: AesKey,
    dev_nonce: u16,
) -> Option<(JoinAccept, SessionKeys)> {
    let encrypted = EncryptedJoinAcceptPayload::new(phy_payload.to_vec()).ok()?;
    let key = AppKey::from(app_key.0);
    let decrypted = encrypted.decrypt(&key);
    if !decrypted.validate_mic(&key) {
        return None;
    }
    let nonce_bytes = dev_nonce.to_le_bytes();
    let nonce = DevNonce::new(&nonce_bytes[..])?;
    let keys = SessionKeys {
        nwk_s_key: AesKey(decrypted.derive_newskey(&nonce, &key).inner().0),
        app_s_key: AesKey(decrypted.derive_appskey(&nonce, &key).inner().0),
    };
    let wire_u24 = |bytes: &[u8]| u32::from_le_bytes([bytes[0], bytes[1], bytes[2], 0]);
    let settings = decrypted.dl_settings();
    let accept = JoinAccept {
        join_nonce: wire_u24(decrypted.app_nonce().as_ref()),
        net_id: wire_u24(decrypted.net_id().as_ref()),
        dev_addr: DevAddr::from_wire(decrypted.dev_addr().as_ref()),
        rx1_dr_offset: settings.rx1_dr_offset(),
        rx2_data_rate: settings.rx2_data_rate(),
        rx_delay: decrypted.rx_delay(),
    };
    Some((accept, keys))
}

/// A data frame to build, downlink or (for simulated devices) uplink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataFrame {
    pub dev_addr: DevAddr,
    /// The full 32-bit counter; the frame carries its low 16 bits.
    pub f_cnt: u32,
    pub confirmed: bool,
    /// Acknowledges the last confirmed frame of the other side.
    pub ack: bool,
    /// Downlinks: more frames are queued for the device.
    pub f_pending: bool,
    /// `None` for a frame without FRMPayload.
    pub f_port: Option<u8>,
    /// The FRMPayload in clear.
    pub frm_payload: Vec<u8>,
}

fn build_data(frame: &DataFrame, uplink: bool, keys: &SessionKeys) -> Result<Vec<u8>, MacError> {
    if frame.f_port.is_none() && !frame.frm_payload.is_empty() {
        return Err(MacError::Build("an FRMPayload needs an FPort".to_owned()));
    }
    let mut fctrl = 0u8;
    if frame.ack {
        fctrl |= 0x20;
    }
    if frame.f_pending && !uplink {
        fctrl |= 0x10;
    }

    let mut creator = DataPayloadCreator::new();
    creator
        .set_uplink(uplink)
        .set_confirmed(frame.confirmed)
        .set_dev_addr(&frame.dev_addr.to_wire())
        .set_fctrl(&FCtrl::new(fctrl, uplink))
        .set_fcnt(frame.f_cnt);
    if let Some(f_port) = frame.f_port {
        creator.set_f_port(f_port);
    }
    let built = creator
        .build(
            &frame.frm_payload,
            &[],
            &NewSKey::from(keys.nwk_s_key.0),
            &AppSKey::from(keys.app_s_key.0),
        )
        .map_err(|error| MacError::Build(format!("{error:?}")))?;
    Ok(built.to_vec())
}

/// Builds an encrypted downlink with its MIC.
pub fn build_data_down(frame: &DataFrame, keys: &SessionKeys) -> Result<Vec<u8>, MacError> {
    build_data(frame, false, keys)
}

/// Builds an encrypted uplink as a device would, for simulations.
pub fn build_data_up(frame: &DataFrame, keys: &SessionKeys) -> Result<Vec<u8>, MacError> {
    build_data(frame, true, keys)
}

/// Builds a join request as a device would, for simulations.
pub fn build_join_request(
    join_eui: Eui64,
    dev_eui: Eui64,
    dev_nonce: u16,
    app_key: AesKey,
) -> Vec<u8> {
    let mut creator = JoinRequestCreator::new();
    creator
        .set_app_eui(&join_eui.to_wire())
        .set_dev_eui(&dev_eui.to_wire())
        .set_dev_nonce(&dev_nonce.to_le_bytes());
    creator.build(&AppKey::from(app_key.0)).to_vec()
}

/// A downlink as a device reads it after decryption, for simulations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedDown {
    pub dev_addr: DevAddr,
    pub f_cnt: u16,
    pub confirmed: bool,
    pub ack: bool,
    pub f_port: Option<u8>,
    pub frm_payload: Vec<u8>,
}

/// Checks the MIC of a downlink with the full counter `f_cnt` and
/// decrypts it, as a device does. Returns `None` for a wrong MIC or a
/// frame that is not a data downlink.
pub fn open_data_down(phy_payload: &[u8], keys: &SessionKeys, f_cnt: u32) -> Option<OpenedDown> {
    let encrypted = EncryptedDataPayload::new(phy_payload.to_vec()).ok()?;
    if encrypted.is_uplink() || !encrypted.validate_mic(&keys.nwk_s_key.aes128(), f_cnt) {
        return None;
    }
    let fhdr = encrypted.fhdr();
    let dev_addr = DevAddr::from_wire(fhdr.dev_addr().as_ref());
    let f_cnt16 = fhdr.fcnt();
    let ack = fhdr.fctrl().ack();
    let confirmed = encrypted.is_confirmed();
    let f_port = encrypted.f_port();
    let nwk = keys.nwk_s_key.aes128();
    let app = keys.app_s_key.aes128();
    let decrypted = encrypted.decrypt(Some(&nwk), Some(&app), f_cnt).ok()?;
    let frm_payload = match decrypted.frm_payload() {
        FRMPayload::Data(data) => data.to_vec(),
        FRMPayload::MACCommands(commands) => commands.data().to_vec(),
        FRMPayload::None => Vec::new(),
    };
    Some(OpenedDown {
        dev_addr,
        f_cnt: f_cnt16,
        confirmed,
        ack,
        f_port,
        frm_payload,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn key(text: &str) -> AesKey {
        AesKey(hex::decode(text).unwrap().try_into().unwrap())
    }

    // Vectors computed with the npm package lora-packet 0.9.3, an
    // implementation independent of the `lorawan` crate.
    const NWK_S_KEY: &str = "44024241ed4ce9a68c6a8bc055233fd3";
    const APP_S_KEY: &str = "ec925802ae430ca77fd3dd73cb2cc588";
    const DATA_UP: &str = "40f17dbe4900020001954378762b11ff0d";
    const APP_KEY: &str = "00112233445566778899aabbccddeeff";
    const JOIN_ACCEPT: &str = "20ed7d076946c5f28fc2740d02a88007c2";

    #[test]
    fn data_uplink_vector_decrypts() {
        let Uplink::Data(data) = parse_uplink(&hex::decode(DATA_UP).unwrap()).unwrap() else {
            panic!("not a data uplink");
        };
        assert_eq!(data.dev_addr, DevAddr(0x49be_7df1));
        assert_eq!(data.f_cnt, 2);
        assert_eq!(data.f_port, Some(1));
        assert!(!data.confirmed);
        assert!(data.verify_mic(key(NWK_S_KEY), 2));
        assert!(!data.verify_mic(key(APP_S_KEY), 2));
        assert!(!data.verify_mic(key(NWK_S_KEY), 0x0001_0002));
        assert_eq!(
            data.decrypt_frm_payload(key(NWK_S_KEY), key(APP_S_KEY), 2),
            b"test"
        );
    }

    #[test]
    fn join_accept_matches_vector_and_keys() {
        let accept = JoinAccept {
            join_nonce: 0x01_0203,
            net_id: 0x13,
            dev_addr: DevAddr(0x2601_1bda),
            rx1_dr_offset: 0,
            rx2_data_rate: 0,
            rx_delay: 1,
        };
        let (phy_payload, keys) = build_join_accept(&accept, key(APP_KEY), 0x0a0b);
        assert_eq!(hex::encode(&phy_payload), JOIN_ACCEPT);
        assert_eq!(keys.nwk_s_key, key("9d3c6b9fd2ce2fe710743026fdf22907"));
        assert_eq!(keys.app_s_key, key("a6ba6c5ee4e26244bf1e2ad1c6f70c7f"));

        let (opened, device_keys) = open_join_accept(&phy_payload, key(APP_KEY), 0x0a0b).unwrap();
        assert_eq!(opened, accept);
        assert_eq!(device_keys, keys);
        assert!(open_join_accept(&phy_payload, key(NWK_S_KEY), 0x0a0b).is_none());
    }

    #[test]
    fn join_request_round_trips_with_mic() {
        let join_eui = Eui64([0x70, 0xb3, 0xd5, 0x7e, 0xd0, 0, 0, 0]);
        let dev_eui = Eui64([0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77]);
        let bytes = build_join_request(join_eui, dev_eui, 0xbeef, key(APP_KEY));
        assert_eq!(bytes.len(), 23);
        // DevEUI travels least significant byte first.
        assert_eq!(bytes[9], 0x77);
        let Uplink::JoinRequest(request) = parse_uplink(&bytes).unwrap() else {
            panic!("not a join request");
        };
        assert_eq!(request.join_eui, join_eui);
        assert_eq!(request.dev_eui, dev_eui);
        assert_eq!(request.dev_eui.to_string(), "0011223344556677");
        assert_eq!(request.dev_nonce, 0xbeef);
        assert!(request.verify_mic(key(APP_KEY)));
        assert!(!request.verify_mic(key(NWK_S_KEY)));
    }

    #[test]
    fn downlink_with_ack_opens_on_device_side() {
        let keys = SessionKeys {
            nwk_s_key: key(NWK_S_KEY),
            app_s_key: key(APP_S_KEY),
        };
        let frame = DataFrame {
            dev_addr: DevAddr(0x2601_1bda),
            f_cnt: 0x0001_0005,
            confirmed: false,
            ack: true,
            f_pending: false,
            f_port: Some(10),
            frm_payload: vec![1, 2, 3],
        };
        let bytes = build_data_down(&frame, &keys).unwrap();
        assert_eq!(bytes[0], 0x60, "MHDR of an unconfirmed data down");
        let opened = open_data_down(&bytes, &keys, 0x0001_0005).unwrap();
        assert_eq!(opened.f_cnt, 5);
        assert!(opened.ack);
        assert_eq!(opened.f_port, Some(10));
        assert_eq!(opened.frm_payload, vec![1, 2, 3]);
        assert!(
            open_data_down(&bytes, &keys, 5).is_none(),
            "MIC covers all 32 bits"
        );

        let empty = DataFrame {
            f_port: None,
            frm_payload: Vec::new(),
            ..frame
        };
        let bytes = build_data_down(&empty, &keys).unwrap();
        assert_eq!(bytes.len(), 12);
        assert_eq!(
            open_data_down(&bytes, &keys, 0x0001_0005).unwrap().f_port,
            None
        );
    }

    #[test]
    fn uplink_built_for_simulation_parses() {
        let keys = SessionKeys {
            nwk_s_key: key(NWK_S_KEY),
            app_s_key: key(APP_S_KEY),
        };
        let frame = DataFrame {
            dev_addr: DevAddr(0x0102_0304),
            f_cnt: 70_000,
            confirmed: true,
            ack: false,
            f_pending: false,
            f_port: Some(2),
            frm_payload: b"hello".to_vec(),
        };
        let bytes = build_data_up(&frame, &keys).unwrap();
        let Uplink::Data(data) = parse_uplink(&bytes).unwrap() else {
            panic!("not a data uplink");
        };
        assert!(data.confirmed);
        assert_eq!(data.f_cnt, 70_000u32 as u16);
        assert!(data.verify_mic(keys.nwk_s_key, 70_000));
        assert_eq!(
            data.decrypt_frm_payload(keys.nwk_s_key, keys.app_s_key, 70_000),
            b"hello"
        );
    }

    #[test]
    fn malformed_frames_are_errors() {
        assert_eq!(parse_uplink(&[]), Err(MacError::TooShort(0)));
        assert!(parse_uplink(&[0x40, 1, 2, 3]).is_err());
        assert!(matches!(
            parse_uplink(&[0x41; 20]),
            Err(MacError::UnsupportedMajor(1))
        ));
        // FOptsLen 15 does not fit in a 12-byte frame.
        let mut short = hex::decode(DATA_UP).unwrap();
        short[5] = 0x0f;
        short.truncate(14);
        assert!(parse_uplink(&short).is_err());
        assert_eq!(
            parse_uplink(&[0x60; 20]),
            Ok(Uplink::Ignored("UnconfirmedDataDown"))
        );
    }

    proptest! {
        #[test]
        fn parse_uplink_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(Uplink::Data(data)) = parse_uplink(&bytes) {
                let _ = data.verify_mic(AesKey([0; 16]), 0);
                let _ = data.decrypt_frm_payload(AesKey([0; 16]), AesKey([0; 16]), 0);
            }
        }
    }
}
