//! Target addresses and device credentials shared by the load subcommands.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use anyhow::Context;

/// Parses `host:port` and rejects any address outside the loopback range,
/// because the benchmarks only ever load servers started on this machine.
pub fn loopback_socket(text: &str) -> anyhow::Result<SocketAddr> {
    let addr: SocketAddr = text.parse().with_context(|| {
        format!("invalid address {text:?}: expected IP:PORT, such as 127.0.0.1:1883")
    })?;
    anyhow::ensure!(
        addr.ip().is_loopback(),
        "the address {addr} is not a loopback address; ferrite-bench only loads servers on 127.0.0.0/8 or [::1]"
    );
    Ok(addr)
}

/// Checks that an HTTP URL names a loopback host (an IP literal or `localhost`).
pub fn ensure_loopback_url(url: &reqwest::Url) -> anyhow::Result<()> {
    let host = url.host_str().unwrap_or("");
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || literal.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    anyhow::ensure!(
        loopback,
        "the URL {url} does not name a loopback host; ferrite-bench only loads servers on 127.0.0.0/8, [::1] or localhost"
    );
    Ok(())
}

/// Loads the MQTT usernames (device access tokens) to connect with: the single
/// `token`, or one per line of `file` (blank lines and `#` comments skipped).
/// An empty list means anonymous connections.
pub fn load_tokens(token: Option<&str>, file: Option<&Path>) -> anyhow::Result<Vec<String>> {
    if let Some(token) = token {
        return Ok(vec![token.to_owned()]);
    }
    let Some(path) = file else {
        return Ok(Vec::new());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the tokens file {}", path.display()))?;
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_owned)
        .collect();
    anyhow::ensure!(
        !tokens.is_empty(),
        "the tokens file {} contains no token; write one device access token per line",
        path.display()
    );
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_socket_accepts_loopback() {
        assert!(loopback_socket("127.0.0.1:1883").is_ok());
        assert!(loopback_socket("127.0.0.2:1883").is_ok());
        assert!(loopback_socket("[::1]:1883").is_ok());
    }

    #[test]
    fn loopback_socket_rejects_other_hosts() {
        assert!(loopback_socket("10.0.0.1:1883").is_err());
        assert!(loopback_socket("0.0.0.0:1883").is_err());
        assert!(loopback_socket("localhost").is_err());
    }

    #[test]
    fn loopback_url_check() {
        let accepted = [
            "http://127.0.0.1:8080/write",
            "http://localhost:1/write",
            "http://[::1]:2/x",
        ];
        for text in accepted {
            let url = reqwest::Url::parse(text).unwrap();
            assert!(ensure_loopback_url(&url).is_ok(), "{text}");
        }
        let rejected = ["http://192.168.1.2:8080/write", "http://example.com/write"];
        for text in rejected {
            let url = reqwest::Url::parse(text).unwrap();
            assert!(ensure_loopback_url(&url).is_err(), "{text}");
        }
    }

    #[test]
    fn tokens_file_skips_blanks_and_comments() {
        let dir = std::env::temp_dir().join(format!("ferrite-bench-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        std::fs::write(&path, "# devices\nfdt_a\n\n  fdt_b  \n").unwrap();

        let tokens = load_tokens(None, Some(&path)).unwrap();
        assert_eq!(tokens, ["fdt_a", "fdt_b"]);

        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(load_tokens(None, Some(&path)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn single_token_wins() {
        let tokens = load_tokens(Some("fdt_x"), None).unwrap();
        assert_eq!(tokens, ["fdt_x"]);
        assert!(load_tokens(None, None).unwrap().is_empty());
    }
}
