//! Session tokens: the router signs them at login, servers verify them locally (no round trip).
//!
//! A token is `base64url(payload) "." base64url(HMAC-SHA256(secret, payload))`, where payload is
//! `v1|user_id|session_id|expires_at_ms|server_id|user_name`. The token is bound to one user,
//! one login (session id) and one server, and expires.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;

/// What a token asserts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// Account id.
    pub user_id: u64,
    /// Account name (shown to other users as the sender).
    pub user_name: String,
    /// Server the session was assigned to.
    pub server_id: String,
    /// Random id of this login; routes and kicks refer to it.
    pub session_id: u64,
    /// Expiry, milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
}

/// Why a token was refused. Each variant has a stable code sent to clients.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// Not a token of this format.
    #[error("malformed token")]
    Malformed,
    /// The signature does not match: forged or signed with another secret.
    #[error("token signature is invalid")]
    BadSignature,
    /// The token's lifetime is over.
    #[error("token has expired")]
    Expired,
    /// The token was issued for a different server.
    #[error("token was issued for another server")]
    WrongServer,
}

impl TokenError {
    /// Stable error code for the wire.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Malformed => "invalid_token",
            TokenError::BadSignature => "invalid_token",
            TokenError::Expired => "token_expired",
            TokenError::WrongServer => "wrong_server",
        }
    }
}

/// Why a secret could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The secret must be hex and at least 16 bytes long.
    #[error("token secret must be at least 32 hex digits")]
    Invalid,
}

/// The shared secret that signs and verifies tokens.
#[derive(Clone)]
pub struct TokenKey {
    key: hmac::Key,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// Builds a key from raw secret bytes.
    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// Parses a hex secret (as written by `cim-certs`).
    pub fn from_hex(hex: &str) -> Result<Self, SecretError> {
        let hex = hex.trim();
        if hex.len() < 32 || !hex.len().is_multiple_of(2) {
            return Err(SecretError::Invalid);
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| SecretError::Invalid)?;
        Ok(Self::new(&bytes))
    }

    /// Signs `claims` into a token string.
    pub fn sign(&self, claims: &Claims) -> String {
        let payload = format!(
            "v1|{}|{}|{}|{}|{}",
            claims.user_id,
            claims.session_id,
            claims.expires_at_ms,
            claims.server_id,
            claims.user_name
        );
        let tag = hmac::sign(&self.key, payload.as_bytes());
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(payload.as_bytes()),
            URL_SAFE_NO_PAD.encode(tag.as_ref())
        )
    }

    /// Verifies signature and expiry; `server_id`, when given, must match the token's server.
    pub fn verify(
        &self,
        token: &str,
        now_ms: u64,
        server_id: Option<&str>,
    ) -> Result<Claims, TokenError> {
        let claims = self.verify_signature(token)?;
        if claims.expires_at_ms <= now_ms {
            return Err(TokenError::Expired);
        }
        if let Some(expected) = server_id
            && expected != claims.server_id
        {
            return Err(TokenError::WrongServer);
        }
        Ok(claims)
    }

    /// The claims of a token this key signed, expired or not: for telling why an expired
    /// token's login ended, never to let it in.
    pub fn verify_signature(&self, token: &str) -> Result<Claims, TokenError> {
        if token.len() > 2048 {
            return Err(TokenError::Malformed);
        }
        let (payload_b64, tag_b64) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload_b64)
            .map_err(|_| TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag_b64)
            .map_err(|_| TokenError::Malformed)?;
        hmac::verify(&self.key, &payload, &tag).map_err(|_| TokenError::BadSignature)?;
        parse_payload(&payload).ok_or(TokenError::Malformed)
    }
}

fn parse_payload(payload: &[u8]) -> Option<Claims> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut parts = text.splitn(6, '|');
    if parts.next()? != "v1" {
        return None;
    }
    Some(Claims {
        user_id: parts.next()?.parse().ok()?,
        session_id: parts.next()?.parse().ok()?,
        expires_at_ms: parts.next()?.parse().ok()?,
        server_id: parts.next()?.to_string(),
        user_name: parts.next()?.to_string(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims {
            user_id: 7,
            user_name: "ali|ce".into(),
            server_id: "s1".into(),
            session_id: 99,
            expires_at_ms: 10_000,
        }
    }

    #[test]
    fn valid_token_round_trips() {
        let key = TokenKey::new(b"0123456789abcdef");
        let token = key.sign(&claims());
        assert_eq!(key.verify(&token, 5_000, Some("s1")), Ok(claims()));
    }

    #[test]
    fn forged_expired_and_misdirected_tokens_are_refused() {
        let key = TokenKey::new(b"0123456789abcdef");
        let other = TokenKey::new(b"another secret!!");
        let token = key.sign(&claims());
        assert_eq!(
            other.verify(&token, 5_000, None),
            Err(TokenError::BadSignature)
        );
        assert_eq!(key.verify(&token, 10_000, None), Err(TokenError::Expired));
        // An expired token's claims can still be read, a forged one's not.
        assert_eq!(key.verify_signature(&token), Ok(claims()));
        assert_eq!(
            other.verify_signature(&token),
            Err(TokenError::BadSignature)
        );
        assert_eq!(
            key.verify(&token, 5_000, Some("s2")),
            Err(TokenError::WrongServer)
        );
        assert_eq!(key.verify("garbage", 0, None), Err(TokenError::Malformed));

        // Changing the payload (say, the user id) breaks the signature.
        let (_, tag) = token.split_once('.').unwrap();
        let forged_payload = URL_SAFE_NO_PAD.encode("v1|8|99|10000|s1|mallory");
        let forged = format!("{forged_payload}.{tag}");
        assert_eq!(
            key.verify(&forged, 5_000, None),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn hex_secrets_parse() {
        assert!(TokenKey::from_hex(&"ab".repeat(16)).is_ok());
        assert!(TokenKey::from_hex("abc").is_err());
        assert!(TokenKey::from_hex(&"zz".repeat(16)).is_err());
    }
}
