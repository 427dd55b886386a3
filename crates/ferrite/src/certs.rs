//! `ferrite certs`: a development CA, a server certificate for the TLS
//! listeners and device client certificates, so that TLS and client
//! certificate authentication can be tried in one step.
//!
//! Keys are ECDSA P-256, written in PEM (PKCS#8) with mode 0600.
//! Certificates are X.509 v3 signed with SHA-256. The CA is meant for
//! development and tests: its key lies next to the certificates, so use a
//! real PKI in production.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use openssl::x509::{X509, X509NameBuilder};

/// File names inside the certificate directory.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const SERVER_CERT: &str = "server.pem";
pub const SERVER_KEY: &str = "server-key.pem";

/// Names that the server certificate always covers.
const LOCAL_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Validity of the CA; server and device certificates take `--days`.
const CA_DAYS: u32 = 3650;

fn new_key() -> anyhow::Result<PKey<Private>> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    Ok(PKey::from_ec_key(EcKey::generate(&group)?)?)
}

fn serial_number() -> anyhow::Result<openssl::asn1::Asn1Integer> {
    let mut serial = BigNum::new()?;
    serial.rand(127, MsbOption::MAYBE_ZERO, false)?;
    Ok(serial.to_asn1_integer()?)
}

fn name(common_name: &str) -> anyhow::Result<openssl::x509::X509Name> {
    let mut builder = X509NameBuilder::new()?;
    builder.append_entry_by_nid(Nid::ORGANIZATIONNAME, "Ferrite development")?;
    builder.append_entry_by_nid(Nid::COMMONNAME, common_name)?;
    Ok(builder.build())
}

/// Writes `bytes` to `path`, readable only by the owner when `private`.
fn write_file(path: &Path, bytes: &[u8], private: bool) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    // `mode` applies only to new files; an existing key file keeps its
    // mode otherwise.
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// The development CA of a directory: loaded when it exists, else created.
struct Ca {
    certificate: X509,
    key: PKey<Private>,
}

impl Ca {
    fn load_or_create(dir: &Path) -> anyhow::Result<(Self, bool)> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        if cert_path.exists() {
            let certificate = X509::from_pem(&std::fs::read(&cert_path)?)
                .with_context(|| format!("{} is not a PEM certificate", cert_path.display()))?;
            let key = PKey::private_key_from_pem(&std::fs::read(&key_path).with_context(|| {
                format!(
                    "cannot read the CA key {}; it must lie next to {}",
                    key_path.display(),
                    cert_path.display()
                )
            })?)
            .with_context(|| format!("{} is not a PEM private key", key_path.display()))?;
            return Ok((Self { certificate, key }, false));
        }

        let key = new_key()?;
        let subject = name("Ferrite development CA")?;
        let mut builder = X509::builder()?;
        builder.set_version(2)?;
        let serial = serial_number()?;
        let not_before = Asn1Time::days_from_now(0)?;
        let not_after = Asn1Time::days_from_now(CA_DAYS)?;
        builder.set_serial_number(&serial)?;
        builder.set_subject_name(&subject)?;
        builder.set_issuer_name(&subject)?;
        builder.set_pubkey(&key)?;
        builder.set_not_before(&not_before)?;
        builder.set_not_after(&not_after)?;
        builder.append_extension(BasicConstraints::new().critical().ca().build()?)?;
        builder.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()?,
        )?;
        let key_id = SubjectKeyIdentifier::new().build(&builder.x509v3_context(None, None))?;
        builder.append_extension(key_id)?;
        builder.sign(&key, MessageDigest::sha256())?;
        let certificate = builder.build();
        write_file(&key_path, &key.private_key_to_pem_pkcs8()?, true)?;
        write_file(&cert_path, &certificate.to_pem()?, false)?;
        Ok((Self { certificate, key }, true))
    }

    /// Issues a leaf certificate for `common_name`.
    fn issue(
        &self,
        common_name: &str,
        days: u32,
        client: bool,
        alt_names: &[String],
    ) -> anyhow::Result<(X509, PKey<Private>)> {
        let key = new_key()?;
        let mut builder = X509::builder()?;
        builder.set_version(2)?;
        let serial = serial_number()?;
        let subject = name(common_name)?;
        let not_before = Asn1Time::days_from_now(0)?;
        let not_after = Asn1Time::days_from_now(days)?;
        builder.set_serial_number(&serial)?;
        builder.set_subject_name(&subject)?;
        builder.set_issuer_name(self.certificate.subject_name())?;
        builder.set_pubkey(&key)?;
        builder.set_not_before(&not_before)?;
        builder.set_not_after(&not_after)?;

        builder.append_extension(BasicConstraints::new().critical().build()?)?;
        builder.append_extension(
            KeyUsage::new()
                .critical()
                .digital_signature()
                .key_agreement()
                .build()?,
        )?;
        let usage = match client {
            true => ExtendedKeyUsage::new().client_auth().build()?,
            false => ExtendedKeyUsage::new().server_auth().build()?,
        };
        builder.append_extension(usage)?;

        if !alt_names.is_empty() {
            let mut san = SubjectAlternativeName::new();
            for alt_name in alt_names {
                match alt_name.parse::<std::net::IpAddr>() {
                    Ok(_) => san.ip(alt_name),
                    Err(_) => san.dns(alt_name),
                };
            }
            let san = san.build(&builder.x509v3_context(Some(&self.certificate), None))?;
            builder.append_extension(san)?;
        }

        let key_id = SubjectKeyIdentifier::new()
            .build(&builder.x509v3_context(Some(&self.certificate), None))?;
        builder.append_extension(key_id)?;
        let authority_id = AuthorityKeyIdentifier::new()
            .keyid(true)
            .build(&builder.x509v3_context(Some(&self.certificate), None))?;
        builder.append_extension(authority_id)?;
        builder.sign(&self.key, MessageDigest::sha256())?;
        Ok((builder.build(), key))
    }
}

fn create_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the directory {}", dir.display()))
}

fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

/// Checks that a name for `--san` is a host name or an IP address.
fn check_alt_name(alt_name: &str) -> anyhow::Result<()> {
    let valid_host = !alt_name.is_empty()
        && alt_name.len() <= 253
        && alt_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '*'));
    anyhow::ensure!(
        valid_host || alt_name.parse::<std::net::IpAddr>().is_ok(),
        "invalid --san {alt_name:?}: give a DNS name such as iot.example.com or an IP address"
    );
    Ok(())
}

/// `ferrite certs init`: creates the CA unless the directory has one, then
/// a new server certificate, and prints the configuration to use.
pub fn init(dir: &Path, alt_names: &[String], days: u32) -> anyhow::Result<()> {
    anyhow::ensure!(days > 0, "--days must be at least 1");
    for alt_name in alt_names {
        check_alt_name(alt_name)?;
    }
    create_dir(dir)?;
    let (ca, created) = Ca::load_or_create(dir)?;
    let mut names: Vec<String> = LOCAL_NAMES.iter().map(|name| name.to_string()).collect();
    for alt_name in alt_names {
        if !names.contains(alt_name) {
            names.push(alt_name.clone());
        }
    }
    let (certificate, key) = ca.issue("localhost", days, false, &names)?;
    // The key first, so that a server polling the files never pairs the
    // new certificate with the old key for longer than one poll.
    write_file(
        &dir.join(SERVER_KEY),
        &key.private_key_to_pem_pkcs8()?,
        true,
    )?;
    let mut chain = certificate.to_pem()?;
    chain.extend_from_slice(&ca.certificate.to_pem()?);
    write_file(&dir.join(SERVER_CERT), &chain, false)?;

    let dir = absolute(dir);
    let ca_state = if created { "created" } else { "reused" };
    println!("# {ca_state} the CA {}", dir.join(CA_CERT).display());
    println!(
        "# wrote the server certificate {} for {}, valid for {days} days",
        dir.join(SERVER_CERT).display(),
        names.join(", ")
    );
    println!("# Add to the configuration file:");
    println!("[tls]");
    println!(
        "cert_file = {:?}",
        dir.join(SERVER_CERT).display().to_string()
    );
    println!(
        "key_file = {:?}",
        dir.join(SERVER_KEY).display().to_string()
    );
    println!("# Devices with a certificate from `ferrite certs device` (CN = device id):");
    println!(
        "client_ca_file = {:?}",
        dir.join(CA_CERT).display().to_string()
    );
    println!("# Or set the environment instead:");
    println!(
        "#   FERRITE_TLS_CERT_FILE={} FERRITE_TLS_KEY_FILE={} FERRITE_TLS_CLIENT_CA_FILE={}",
        dir.join(SERVER_CERT).display(),
        dir.join(SERVER_KEY).display(),
        dir.join(CA_CERT).display()
    );
    println!(
        "# Then: curl --cacert {} https://localhost:8443/healthz",
        dir.join(CA_CERT).display()
    );
    Ok(())
}

/// `ferrite certs device`: issues a client certificate whose subject CN is
/// `common_name` (a device id, or a device name for a registered CA).
pub fn device(dir: &Path, common_name: &str, days: u32) -> anyhow::Result<()> {
    anyhow::ensure!(days > 0, "--days must be at least 1");
    anyhow::ensure!(
        !common_name.is_empty()
            && common_name.len() <= 64
            && !common_name.chars().any(char::is_control),
        "invalid device {common_name:?}: give the device id, or its name, of 1 to 64 characters without control characters (the limit of an X.509 common name)"
    );
    anyhow::ensure!(
        dir.join(CA_CERT).exists(),
        "no CA in {}: run `ferrite certs init --dir {}` first",
        dir.display(),
        dir.display()
    );
    let (ca, _) = Ca::load_or_create(dir)?;
    let (certificate, key) = ca.issue(common_name, days, true, &[])?;
    let file_stem: String = common_name
        .chars()
        .map(|c| match c.is_ascii_alphanumeric() || c == '-' {
            true => c,
            false => '_',
        })
        .collect();
    let cert_path = dir.join(format!("device-{file_stem}.pem"));
    let key_path = dir.join(format!("device-{file_stem}-key.pem"));
    write_file(&key_path, &key.private_key_to_pem_pkcs8()?, true)?;
    write_file(&cert_path, &certificate.to_pem()?, false)?;

    let ca_path = absolute(&dir.join(CA_CERT));
    let cert_path = absolute(&cert_path);
    let key_path = absolute(&key_path);
    let fingerprint = hex::encode(crate::tls::sha256(&certificate.to_der()?));
    println!(
        "# wrote the client certificate {} (CN={common_name}, SHA-256 {fingerprint}) and its key {}",
        cert_path.display(),
        key_path.display()
    );
    println!(
        "# The server accepts it when tls.client_ca_file is {} and the CN is a device id,",
        ca_path.display()
    );
    println!("# when a tenant registered the CA with POST /api/v1/device-cas, or when the");
    println!("# certificate is registered on the device. Then, for example:");
    println!(
        "mosquitto_pub -h localhost -p 8883 --cafile {} --cert {} --key {} -t v1/devices/me/telemetry -m '{{\"temperature\": 21.5}}'",
        ca_path.display(),
        cert_path.display(),
        key_path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_chain_to_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &["iot.example.com".to_owned()], 1).unwrap();
        let (ca, created) = Ca::load_or_create(dir.path()).unwrap();
        assert!(!created, "the CA is reused");
        let chain =
            X509::stack_from_pem(&std::fs::read(dir.path().join(SERVER_CERT)).unwrap()).unwrap();
        assert_eq!(chain.len(), 2, "server certificate and CA");
        assert!(
            chain[0]
                .verify(&ca.certificate.public_key().unwrap())
                .unwrap()
        );
        let alt_names: Vec<String> = chain[0]
            .subject_alt_names()
            .unwrap()
            .iter()
            .map(|name| {
                name.dnsname()
                    .map(str::to_owned)
                    .or_else(|| name.ipaddress().map(|ip| format!("{ip:?}")))
                    .unwrap()
            })
            .collect();
        assert!(alt_names.contains(&"localhost".to_owned()), "{alt_names:?}");
        assert!(
            alt_names.contains(&"iot.example.com".to_owned()),
            "{alt_names:?}"
        );
        assert_eq!(alt_names.len(), 4, "{alt_names:?}");

        device(dir.path(), "sensor-1", 1).unwrap();
        let leaf = X509::from_pem(&std::fs::read(dir.path().join("device-sensor-1.pem")).unwrap())
            .unwrap();
        assert!(leaf.verify(&ca.certificate.public_key().unwrap()).unwrap());
        assert_eq!(
            crate::adapters::coap::dtls::common_name(&leaf).as_deref(),
            Some("sensor-1")
        );
    }

    #[cfg(unix)]
    #[test]
    fn private_keys_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &[], 1).unwrap();
        device(dir.path(), "d", 1).unwrap();
        for file in [CA_KEY, SERVER_KEY, "device-d-key.pem"] {
            let mode = std::fs::metadata(dir.path().join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
    }

    #[test]
    fn bad_alt_name_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let error = init(dir.path(), &["bad name!".to_owned()], 1).unwrap_err();
        assert!(error.to_string().contains("--san"), "{error}");
    }
}
