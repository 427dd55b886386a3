//! Rules for new passwords.
//!
//! A password must have at least [`MIN_PASSWORD_CHARS`] characters, must
//! not be the account's email or the part before the `@`, must not use
//! fewer than [`MIN_DISTINCT_CHARS`] different characters, and must not be
//! a common password. A password counts as common when, in lower case and
//! with trailing digits and punctuation removed, it is in the embedded
//! list, so `Password2024!` is rejected like `password`.
//!
//! The list (`common_passwords.txt`) holds 629 entries taken in order from
//! the start of `Passwords/Common-Credentials/10k-most-common.txt` in
//! SecLists (github.com/danielmiessler/SecLists, MIT license), with
//! profanity left out.

use std::collections::HashSet;
use std::sync::LazyLock;

/// Minimum length in Unicode scalar values.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// Maximum length, so that hashing cost stays bounded.
pub const MAX_PASSWORD_BYTES: usize = 1024;
/// Minimum number of different characters, against `aaaaaaaaaaaa`.
pub const MIN_DISTINCT_CHARS: usize = 5;

static COMMON_PASSWORDS: LazyLock<HashSet<&'static str>> =
    LazyLock::new(|| include_str!("common_passwords.txt").lines().collect());

/// Checks a new password for `email` against the rules of this module and
/// returns what is wrong in a sentence for the user.
pub fn check_password_rules(password: &str, email: Option<&str>) -> Result<(), String> {
    let length = password.chars().count();
    if length < MIN_PASSWORD_CHARS {
        return Err(format!(
            "the password has {length} characters; use at least {MIN_PASSWORD_CHARS}, for example a few unrelated words"
        ));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(format!(
            "the password is longer than {MAX_PASSWORD_BYTES} bytes; use a shorter one"
        ));
    }
    let lower = password.to_lowercase();
    if let Some(email) = email {
        let email = email.to_lowercase();
        let local_part = email.split('@').next().unwrap_or_default();
        if lower == email || lower == local_part {
            return Err("the password must not be the email address or its user name".to_owned());
        }
    }
    let distinct: HashSet<char> = password.chars().collect();
    if distinct.len() < MIN_DISTINCT_CHARS {
        return Err(format!(
            "the password uses only {} different characters; use at least {MIN_DISTINCT_CHARS}",
            distinct.len()
        ));
    }
    let base = lower.trim_end_matches(|c: char| c.is_ascii_digit() || c.is_ascii_punctuation());
    if base.is_empty() {
        return Err(
            "the password has only digits and punctuation; add letters, for example a few unrelated words"
                .to_owned(),
        );
    }
    if COMMON_PASSWORDS.contains(lower.as_str()) || COMMON_PASSWORDS.contains(base) {
        return Err(
            "the password is too common (it is in a list of the most used passwords, perhaps with digits or symbols added); choose another"
                .to_owned(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_password_is_rejected() {
        let error = check_password_rules("short1!", None).unwrap_err();
        assert!(error.contains("at least 12"), "{error}");
    }

    #[test]
    fn common_password_with_suffix_is_rejected() {
        for password in [
            "password1234",
            "Password2024!",
            "qwerty123456",
            "1234567890123",
        ] {
            let error = check_password_rules(password, None).unwrap_err();
            assert!(
                error.contains("too common") || error.contains("only digits"),
                "{password}: {error}"
            );
        }
    }

    #[test]
    fn email_as_password_is_rejected() {
        let error =
            check_password_rules("Alice.Smith@example.com", Some("alice.smith@example.com"))
                .unwrap_err();
        assert!(error.contains("email"), "{error}");
        assert!(check_password_rules("alice.smith1", Some("alice.smith1@example.com")).is_err());
    }

    #[test]
    fn repeated_characters_are_rejected() {
        assert!(check_password_rules("aaaaaaaaaaaaaaaa", None).is_err());
        assert!(check_password_rules("abababababab", None).is_err());
    }

    #[test]
    fn strong_password_is_accepted() {
        assert!(check_password_rules("correct horse battery staple", None).is_ok());
        assert!(check_password_rules("interop-admin-password", Some("admin@example.com")).is_ok());
    }

    #[test]
    fn list_is_loaded() {
        assert!(COMMON_PASSWORDS.len() > 600);
        assert!(COMMON_PASSWORDS.contains("letmein"));
    }
}
