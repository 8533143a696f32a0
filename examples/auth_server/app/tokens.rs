//! JWTs: access and refresh tokens (HS256), their verification, and the revocation list that makes logout and
//! refresh-token rotation stick.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, header};
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sqlx::AnyPool;

use super::error::ApiError;

pub(crate) struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    access_ttl: Duration,
    refresh_ttl: Duration,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub email: String,
    pub typ: String,
    pub jti: String,
    pub iat: u64,
    pub exp: u64,
}

#[derive(Serialize)]
pub(crate) struct TokenPair {
    access_token: String,
    refresh_token: String,
    token_type: &'static str,
    expires_in: u64,
}

pub(crate) fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Tokens {
    pub(crate) fn new(secret: &[u8], access_ttl: Duration, refresh_ttl: Duration) -> Self {
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            access_ttl,
            refresh_ttl,
        }
    }

    pub(crate) fn issue(&self, user_id: &str, email: &str) -> Result<TokenPair, ApiError> {
        let sign = |typ: &str, ttl: Duration| {
            let iat = now();
            let claims = Claims {
                sub: user_id.to_owned(),
                email: email.to_owned(),
                typ: typ.to_owned(),
                jti: uuid::Uuid::new_v4().to_string(),
                iat,
                exp: iat + ttl.as_secs(),
            };
            jsonwebtoken::encode(&Header::default(), &claims, &self.encoding).map_err(ApiError::internal)
        };
        Ok(TokenPair {
            access_token: sign("access", self.access_ttl)?,
            refresh_token: sign("refresh", self.refresh_ttl)?,
            token_type: "bearer",
            expires_in: self.access_ttl.as_secs(),
        })
    }

    /// Why a presented token is refused, in words for the audit trail (never shown to the client).
    pub(crate) fn verify(&self, token: &str, typ: &str) -> Result<Claims, &'static str> {
        let mut validation = Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.leeway = 0;
        let claims = jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => "expired",
                jsonwebtoken::errors::ErrorKind::InvalidSignature => "bad_signature",
                _ => "malformed",
            })?
            .claims;
        if claims.typ != typ {
            return Err("wrong_token_type");
        }
        Ok(claims)
    }
}

pub(crate) async fn is_revoked(users: &AnyPool, jti: &str) -> Result<bool, ApiError> {
    let found: Option<String> =
        sqlx::query_scalar("SELECT jti FROM revoked_tokens WHERE jti = $1").bind(jti).fetch_optional(users).await?;
    Ok(found.is_some())
}

pub(crate) async fn revoke(users: &AnyPool, claims: &Claims) -> Result<(), ApiError> {
    sqlx::query("INSERT INTO revoked_tokens (jti, expires_at) VALUES ($1, $2) ON CONFLICT (jti) DO NOTHING")
        .bind(&claims.jti)
        .bind(claims.exp as i64)
        .execute(users)
        .await?;
    Ok(())
}

/// The token in `Authorization: Bearer …`.
pub(crate) fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::unauthorized("missing bearer token"))
}
