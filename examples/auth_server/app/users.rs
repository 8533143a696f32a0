//! The user store (SQLite or Postgres through `sqlx::Any`): its tables, its queries, and what a valid
//! registration is.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;

use super::error::ApiError;
use super::tokens::now;

/// Opens the user store and creates its tables (users, revoked tokens, and the inline anti-pattern's audit table).
pub(crate) async fn connect(url: &str, pool_size: u32, acquire_timeout: Duration) -> Result<AnyPool, sqlx::Error> {
    sqlx::any::install_default_drivers();
    let users = AnyPoolOptions::new().max_connections(pool_size).acquire_timeout(acquire_timeout).connect(url).await?;
    if url.starts_with("sqlite:") {
        sqlx::query("PRAGMA journal_mode = WAL").execute(&users).await?;
    }
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS users (
            id TEXT PRIMARY KEY,
            email TEXT NOT NULL UNIQUE,
            password_hash TEXT NOT NULL,
            country TEXT NOT NULL,
            annual_income DOUBLE PRECISION NOT NULL,
            timezone TEXT NOT NULL,
            created_at BIGINT NOT NULL
        );
        CREATE TABLE IF NOT EXISTS revoked_tokens (jti TEXT PRIMARY KEY, expires_at BIGINT NOT NULL);
        CREATE TABLE IF NOT EXISTS inline_audit (
            time BIGINT NOT NULL, method TEXT NOT NULL, path TEXT NOT NULL, status INTEGER NOT NULL
        );",
    )
    .execute(&users)
    .await?;
    Ok(users)
}

pub(crate) async fn email_taken(users: &AnyPool, email: &str) -> Result<bool, sqlx::Error> {
    let exists: Option<String> =
        sqlx::query_scalar("SELECT id FROM users WHERE email = $1").bind(email).fetch_optional(users).await?;
    Ok(exists.is_some())
}

/// Inserts a validated registration; a concurrent registration of the same email fails with a unique violation.
pub(crate) async fn insert(
    users: &AnyPool,
    id: &str,
    email: &str,
    password_hash: &str,
    req: &RegisterRequest,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO users (id, email, password_hash, country, annual_income, timezone, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id)
    .bind(email)
    .bind(password_hash)
    .bind(req.country.trim().to_ascii_uppercase())
    .bind(req.annual_income)
    .bind(req.timezone.trim())
    .bind(now() as i64)
    .execute(users)
    .await?;
    Ok(())
}

/// The id and password hash of the user with this (normalised) email.
pub(crate) async fn credentials(users: &AnyPool, email: &str) -> Result<Option<(String, String)>, sqlx::Error> {
    sqlx::query_as("SELECT id, password_hash FROM users WHERE email = $1").bind(email).fetch_optional(users).await
}

#[derive(Serialize)]
pub(crate) struct UserView {
    id: String,
    email: String,
    country: String,
    annual_income: f64,
    timezone: String,
    created_at: i64,
}

pub(crate) async fn find(users: &AnyPool, id: &str) -> Result<Option<UserView>, sqlx::Error> {
    let user: Option<(String, String, String, f64, String, i64)> =
        sqlx::query_as("SELECT id, email, country, annual_income, timezone, created_at FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(users)
            .await?;
    Ok(user.map(|(id, email, country, annual_income, timezone, created_at)| UserView {
        id,
        email,
        country,
        annual_income,
        timezone,
        created_at,
    }))
}

#[derive(Deserialize)]
pub(crate) struct RegisterRequest {
    email: String,
    pub(crate) password: String,
    country: String,
    annual_income: f64,
    timezone: String,
}

pub(crate) fn normalise_email(email: &str) -> Result<String, ApiError> {
    let email = email.trim().to_lowercase();
    let valid = email.len() <= 254
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && !domain.contains('@')
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
        })
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if valid { Ok(email) } else { Err(ApiError::invalid("email: not a valid email address")) }
}

/// ISO 3166-1 alpha-2 codes.
const COUNTRIES: &str = "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS \
BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM \
FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP \
KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV \
MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD \
SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC \
VE VG VI VN VU WF WS YE YT ZA ZM ZW";

/// Checks a registration; returns the normalised email.
pub(crate) fn validate(req: &RegisterRequest) -> Result<String, ApiError> {
    let email = normalise_email(&req.email)?;
    let chars = req.password.chars().count();
    if chars < 8 {
        return Err(ApiError::invalid("password: must be at least 8 characters"));
    }
    if chars > 128 {
        return Err(ApiError::invalid("password: must be at most 128 characters"));
    }
    let country = req.country.trim();
    if country.len() != 2 || !COUNTRIES.split(' ').any(|c| c == country.to_ascii_uppercase()) {
        return Err(ApiError::invalid("country: not an ISO 3166-1 alpha-2 country code"));
    }
    if !req.annual_income.is_finite() || req.annual_income < 0.0 {
        return Err(ApiError::invalid("annual_income: must be a non-negative number"));
    }
    if jiff::tz::TimeZone::get(req.timezone.trim()).is_err() {
        return Err(ApiError::invalid("timezone: not a known IANA time zone (e.g. Europe/Paris)"));
    }
    Ok(email)
}
