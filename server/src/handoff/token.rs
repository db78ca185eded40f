//! Handoff tokens: HMAC-SHA256 of a vm_id under the agent's secret. One token per VM lets its VMM
//! acquire, adopt and attach for that VM only; the secret lives in the state database, so a token
//! survives restarts. The agent answers with [`crate::engine::Agent::vm_token`] and
//! [`crate::engine::Agent::check_token`].

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// SHA-256's block size: HMAC pads a shorter key with zeros to this length and hashes a longer one.
const BLOCK: usize = 64;

/// The agent's token secret.
#[derive(Clone)]
pub struct TokenKey {
    /// The key as HMAC uses it: padded to one block (or hashed first, when longer).
    block: [u8; BLOCK],
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// A key from the stored secret (any length, as HMAC allows).
    pub fn new(secret: &[u8]) -> Self {
        let mut block = [0u8; BLOCK];
        if secret.len() <= BLOCK {
            block[..secret.len()].copy_from_slice(secret);
        } else {
            block[..32].copy_from_slice(&Sha256::digest(secret));
        }
        Self { block }
    }

    /// The token of a VM, in lower-case hex.
    pub fn token(&self, vm_id: &str) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new(&self.block.into());
        mac.update(vm_id.as_bytes());
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Whether `token` is the VM's token, compared in constant time.
    pub fn check(&self, vm_id: &str, token: &str) -> bool {
        use subtle::ConstantTimeEq;
        let want = self.token(vm_id);
        want.len() == token.len() && bool::from(want.as_bytes().ct_eq(token.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hmac::digest::KeyInit;

    /// The padded key gives exactly HMAC over the key as stored, for short and long secrets.
    #[test]
    fn tokens_are_hmac_sha256_of_the_vm_id() {
        for len in [0, 1, 32, 64, 65, 200] {
            let secret: Vec<u8> = (0..len).map(|i| i as u8 ^ 0x5a).collect();
            let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&secret).unwrap();
            mac.update(b"vm-1");
            let want: String = mac
                .finalize()
                .into_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let key = TokenKey::new(&secret);
            assert_eq!(key.token("vm-1"), want, "secret of {len} bytes");
            assert!(key.check("vm-1", &want));
            assert!(!key.check("vm-2", &want));
            assert!(!key.check("vm-1", &want[1..]));
        }
    }
}
