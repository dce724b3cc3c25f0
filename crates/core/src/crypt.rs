//! Encryption at rest with age (X25519 recipients): the keys, and the one codec step of the
//! envelope ([`AGE`]) that encrypts after compression.
//!
//! The host that writes needs only public keys ([`Recipients`]); reading needs a secret key
//! ([`Identities`]). An encrypted object keeps in clear what listing and planning read (its
//! metadata, see docs/repository-format.md) and a checksum of its stored form, so that it can
//! be checked whole without the identity.

use std::io::{Read, Write};
use std::str::FromStr;

/// The codec id of age encryption in an envelope's chain (always the last step).
pub const AGE: u8 = 16;

/// A new X25519 key pair: (public key `age1...`, secret key `AGE-SECRET-KEY-1...`).
pub fn generate() -> (String, String) {
    use age::secrecy::ExposeSecret;
    let id = age::x25519::Identity::generate();
    (id.to_public().to_string(), id.to_string().expose_secret().to_string())
}

/// Public keys new objects are encrypted to.
pub struct Recipients {
    keys: Vec<age::x25519::Recipient>,
    /// As configured (`age1...`), for metadata and messages.
    text: Vec<String>,
}

impl std::fmt::Debug for Recipients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.text).finish()
    }
}

impl Recipients {
    /// Parses `age1...` public keys (one per item; `#` comments and blank lines skipped, as in a
    /// recipients file). `source` names where they come from, for the error.
    pub fn parse<'a>(lines: impl IntoIterator<Item = &'a str>, source: &str) -> Result<Recipients, String> {
        let mut keys = Vec::new();
        let mut text = Vec::new();
        for (n, line) in lines.into_iter().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line.starts_with("ssh-") {
                return Err(format!(
                    "{source}, entry {}: ssh keys are not supported; use an age X25519 public key (age1..., made by \
                     `age-keygen`)",
                    n + 1
                ));
            }
            let key = age::x25519::Recipient::from_str(line).map_err(|e| {
                format!("{source}, entry {}: {line:?} is not an age public key ({e}); expected age1...", n + 1)
            })?;
            keys.push(key);
            text.push(line.to_string());
        }
        if keys.is_empty() {
            return Err(format!("{source}: no recipient: give at least one age public key (age1...)"));
        }
        Ok(Recipients { keys, text })
    }

    pub fn public_keys(&self) -> &[String] {
        &self.text
    }

    fn encryptor(&self) -> age::Encryptor {
        age::Encryptor::with_recipients(self.keys.iter().map(|k| k as &dyn age::Recipient))
            .expect("X25519 recipients are compatible with each other")
    }

    /// Encrypts a whole payload.
    pub fn encrypt(&self, plain: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(plain.len() + plain.len() / 4096 * 16 + 256);
        let mut w = self.encryptor().wrap_output(&mut out).expect("writing into memory");
        w.write_all(plain).expect("writing into memory");
        w.finish().expect("writing into memory");
        out
    }

    /// A writer that encrypts what it is given into `inner`; `finish` it.
    pub fn writer<W: Write>(&self, inner: W) -> std::io::Result<age::stream::StreamWriter<W>> {
        self.encryptor().wrap_output(inner)
    }
}

/// Secret keys objects are decrypted with.
pub struct Identities {
    keys: Vec<age::x25519::Identity>,
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys themselves.
        write!(f, "Identities({} key(s): {:?})", self.keys.len(), self.public_keys())
    }
}

impl Identities {
    /// Parses an age identity file (`AGE-SECRET-KEY-1...` lines; `#` comments and blank lines
    /// skipped) or the key itself. The error never repeats the text (it is secret).
    pub fn parse(text: &str, source: &str) -> Result<Identities, String> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let key = age::x25519::Identity::from_str(line).map_err(|_| {
                format!(
                    "{source}, line {}: not an age secret key (expected AGE-SECRET-KEY-1..., made by `age-keygen`)",
                    n + 1
                )
            })?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(format!("{source}: no age secret key in it (expected AGE-SECRET-KEY-1...)"));
        }
        Ok(Identities { keys })
    }

    /// The public keys (recipients) these identities open.
    pub fn public_keys(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.to_public().to_string()).collect()
    }

    /// A reader of the plaintext of the age payload `payload`.
    pub fn reader<'a, R: Read + 'a>(&self, payload: R) -> Result<Box<dyn Read + 'a>, Refused> {
        let d = age::Decryptor::new(payload).map_err(Refused::from)?;
        let r = d.decrypt(self.keys.iter().map(|k| k as &dyn age::Identity)).map_err(Refused::from)?;
        Ok(Box::new(r))
    }

    /// Decrypts a whole payload.
    pub fn decrypt(&self, payload: &[u8]) -> Result<Vec<u8>, Refused> {
        let mut out = Vec::with_capacity(payload.len());
        self.reader(payload)?.read_to_end(&mut out).map_err(|e| Refused::Corrupt(e.to_string()))?;
        Ok(out)
    }
}

/// Why a payload did not decrypt.
#[derive(Debug)]
pub enum Refused {
    /// None of the identities is a recipient of it.
    NotARecipient,
    /// Truncated or altered ciphertext, a bad header.
    Corrupt(String),
}

impl From<age::DecryptError> for Refused {
    fn from(e: age::DecryptError) -> Refused {
        match e {
            age::DecryptError::NoMatchingKeys => Refused::NotARecipient,
            other => Refused::Corrupt(other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Identities, Recipients) {
        let id = age::x25519::Identity::generate();
        let public = id.to_public().to_string();
        let secret = {
            use age::secrecy::ExposeSecret;
            id.to_string().expose_secret().to_string()
        };
        (Identities::parse(&secret, "test").unwrap(), Recipients::parse([public.as_str()], "test").unwrap())
    }

    #[test]
    fn round_trip_wrong_key_and_tampering() {
        let (id, to) = pair();
        let (other, _) = pair();
        let plain: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let sealed = to.encrypt(&plain);
        assert_eq!(id.decrypt(&sealed).unwrap(), plain);
        assert!(matches!(other.decrypt(&sealed), Err(Refused::NotARecipient)));
        let mut bad = sealed.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 1;
        assert!(matches!(id.decrypt(&bad), Err(Refused::Corrupt(_))));
        assert!(matches!(id.decrypt(&sealed[..sealed.len() - 10]), Err(Refused::Corrupt(_))));
        assert_eq!(id.public_keys(), to.public_keys());
    }

    #[test]
    fn bad_keys_are_named_without_the_secret() {
        let e = Recipients::parse(["age1nope"], "[encryption] recipients").unwrap_err();
        assert!(e.contains("[encryption] recipients, entry 1") && e.contains("age1nope"), "{e}");
        let e = Recipients::parse(["ssh-ed25519 AAAA"], "r").unwrap_err();
        assert!(e.contains("ssh keys are not supported"), "{e}");
        let e = Identities::parse("AGE-SECRET-KEY-1SECRETSTUFF", "WALNUT_AGE_IDENTITY").unwrap_err();
        assert!(e.contains("WALNUT_AGE_IDENTITY, line 1") && !e.contains("SECRETSTUFF"), "{e}");
        assert!(Recipients::parse(["# only a comment"], "f").unwrap_err().contains("no recipient"));
    }
}
