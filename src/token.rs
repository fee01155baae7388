//! Token format: generation, parsing with checksum, and the two secret checks (argon2id at rest, a
//! keyed fast digest for cache hits).
//!
//! A token is `tgp_` or `tgs_`, 6 id characters, a 30-character base62 secret (178 bits) and a
//! 6-character base62 CRC32 of everything before it. The first 10 characters are the token id, which
//! is not secret. Parsing is pure and rejects anything malformed before a cache or store is touched.

use std::fmt;

use argon2::password_hash::{Output, PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use rand::Rng;
use serde::{Deserialize, Serialize};

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const PREFIX_LEN: usize = 4;
const ID_CHARS: usize = 6;
const SECRET_CHARS: usize = 30;
const CHECKSUM_CHARS: usize = 6;
/// Length of a token id: prefix plus id characters, e.g. `tgp_a1B2c3`.
pub const ID_LEN: usize = PREFIX_LEN + ID_CHARS;
/// Length of a whole token.
pub const TOKEN_LEN: usize = ID_LEN + SECRET_CHARS + CHECKSUM_CHARS;

/// Who a token belongs to, as told by its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    /// A personal access token: acts with its user's current role.
    Pat,
    /// A service token: acts with the service's fixed roles.
    Service,
}

/// The prefixes of stored tokens, a PAT's and a service token's: what marks text as a token.
pub const PREFIXES: [&str; 2] = ["tgp_", "tgs_"];

impl TokenKind {
    fn prefix(self) -> &'static str {
        match self {
            TokenKind::Pat => PREFIXES[0],
            TokenKind::Service => PREFIXES[1],
        }
    }

    fn from_prefix(prefix: &str) -> Option<Self> {
        match prefix {
            "tgp_" => Some(TokenKind::Pat),
            "tgs_" => Some(TokenKind::Service),
            _ => None,
        }
    }

    /// The name used in `X-Auth-Token-Kind` and in listings.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenKind::Pat => "pat",
            TokenKind::Service => "service",
        }
    }
}

/// The public, non-secret first 10 characters of a token.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TokenId(String);

impl TokenId {
    /// Parses a token id as shown in lists (`tgp_a1B2c3`).
    pub fn parse(s: &str) -> Option<Self> {
        let kind_ok = s.get(..PREFIX_LEN).and_then(TokenKind::from_prefix).is_some();
        let body_ok = s.len() == ID_LEN && s.bytes().skip(PREFIX_LEN).all(is_base62);
        (kind_ok && body_ok).then(|| TokenId(s.to_owned()))
    }

    /// The kind told by the id's prefix.
    pub fn kind(&self) -> TokenKind {
        // The constructor only admits known prefixes.
        TokenKind::from_prefix(&self.0[..PREFIX_LEN]).unwrap_or(TokenKind::Pat)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TokenId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        TokenId::parse(&s).ok_or_else(|| format!("not a token id: {s:?}"))
    }
}

impl From<TokenId> for String {
    fn from(id: TokenId) -> String {
        id.0
    }
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenId({})", self.0)
    }
}

/// A token that passed the format and checksum checks. Borrowed from the request.
pub struct ParsedToken<'a> {
    /// The token id (first 10 characters).
    pub id: TokenId,
    /// The secret part. Never logged.
    pub secret: &'a str,
}

impl fmt::Debug for ParsedToken<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParsedToken").field("id", &self.id).field("secret", &"<redacted>").finish()
    }
}

/// Why a string is not a well-formed token. Never shown to clients in detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Wrong length.
    #[error("wrong length")]
    Length,
    /// Unknown prefix.
    #[error("unknown prefix")]
    Prefix,
    /// A character outside base62.
    #[error("character outside base62")]
    Alphabet,
    /// The checksum does not match.
    #[error("checksum mismatch")]
    Checksum,
}

/// What may be repeated of a value a client sent (in a log line, an error message) when it holds
/// a credential, perhaps a whole token pasted in the wrong place: the token's id (`tgp_AbCdEf…`),
/// or `eyJ…` for what may be a JWT. `None` when it holds none.
pub fn redacted(text: &str) -> Option<String> {
    runs(text).find_map(|(_, run)| credential_in(run)).map(|(_, said)| said)
}

/// `text` (an error message, say) with every token or JWT in it cut to what [`redacted`] leaves.
pub fn redacted_within(text: &str) -> std::borrow::Cow<'_, str> {
    if redacted(text).is_none() {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut done = 0;
    for (start, run) in runs(text) {
        if let Some((at, said)) = credential_in(run) {
            out.push_str(&text[done..start + at]);
            out.push_str(&said);
            done = start + run.len();
        }
    }
    out.push_str(&text[done..]);
    std::borrow::Cow::Owned(out)
}

/// A whole token (its checksum right) or something like a JWT in `text`, as logs show one: what a
/// value given for keeping (a name, attributes) may not hold. Stricter than [`redacted`] for
/// tokens, so that a name that merely starts like one (`tgp_migration`) is not taken for one.
pub fn whole_credential_in(text: &str) -> Option<String> {
    runs(text).find_map(|(_, run)| {
        let token = PREFIXES.iter().flat_map(|p| run.match_indices(p)).find_map(|(at, _)| {
            run.get(at..at + TOKEN_LEN).filter(|t| parse(t).is_ok()).map(|t| format!("{}…", &t[..ID_LEN]))
        });
        // A JWT's header alone is longer than a word (`eyJhbGciOiJFZERTQSJ9`: 20 characters), so
        // `eyJane.doe.example` is no JWT here.
        let jwt = || {
            jwt_start(run).filter(|&at| run[at..].split('.').next().is_some_and(|header| header.len() >= 16))
        };
        token.or_else(|| jwt().map(|_| JWT_SHOWN.to_string()))
    })
}

/// The runs of the characters tokens and JWTs are made of, each with its offset in `text`, and
/// without a sentence's full stop (or a dash) after it.
fn runs(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let part_of_token = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    text.split(move |c| !part_of_token(c))
        .map(move |run| (run.as_ptr() as usize - text.as_ptr() as usize, run.trim_end_matches(['.', '-'])))
        .filter(|(_, run)| !run.is_empty())
}

/// Where a credential starts in a run, and what may be said of it: a token by its id; a JWT
/// (from `eyJ`, base64 of `{"`, at the run's start or after a `_`, `-` or `.`, in three non-empty
/// parts to the run's end: an address such as `heyJoe.van.dam@acme.io` is none) as `eyJ…`.
fn credential_in(run: &str) -> Option<(usize, String)> {
    let token = PREFIXES.iter().filter_map(|p| run.find(p)).min().filter(|at| run.len() - at > ID_LEN);
    if let Some(at) = token {
        return Some((at, format!("{}…", &run[at..at + ID_LEN])));
    }
    jwt_start(run).map(|at| (at, JWT_SHOWN.to_string()))
}

/// What is said of something like a JWT: its start (base64 of `{"`), never more.
const JWT_SHOWN: &str = "eyJ…";

/// Where something like a JWT starts in a run: see [`credential_in`].
fn jwt_start(run: &str) -> Option<usize> {
    // At the run's start or after a separator in it (`jwt_eyJ…`, `id-eyJ…`), at the first such
    // start that is one; not within a word (`heyJoe`). In one pass over the run, whatever it holds
    // (this runs on every request's path, which a client writes): from `at`, the run is three
    // non-empty parts or more when two dots or more follow and no `..` does (a run neither starts
    // with `eyJ`'s dot nor ends with one).
    let bytes = run.as_bytes();
    let dots = bytes.iter().filter(|&&b| b == b'.').count();
    let last_empty_part = run.rfind("..");
    let (mut dots_before, mut counted_to, mut from) = (0, 0, 0);
    while let Some(at) = run[from..].find("eyJ").map(|at| from + at) {
        dots_before += bytes[counted_to..at].iter().filter(|&&b| b == b'.').count();
        counted_to = at;
        let starts = at == 0 || matches!(bytes[at - 1], b'_' | b'-' | b'.');
        if starts && dots - dots_before >= 2 && last_empty_part.is_none_or(|dd| dd < at) {
            return Some(at);
        }
        from = at + 3;
    }
    None
}

/// Checks format and checksum. Pure: no cache or store is involved.
pub fn parse(token: &str) -> Result<ParsedToken<'_>, FormatError> {
    if token.len() != TOKEN_LEN {
        return Err(FormatError::Length);
    }
    let prefix = token.get(..PREFIX_LEN).ok_or(FormatError::Prefix)?;
    TokenKind::from_prefix(prefix).ok_or(FormatError::Prefix)?;
    if !token.bytes().skip(PREFIX_LEN).all(is_base62) {
        return Err(FormatError::Alphabet);
    }
    // All bytes are ASCII from here, so slicing cannot split a character.
    let (body, checksum) = token.split_at(TOKEN_LEN - CHECKSUM_CHARS);
    if checksum.as_bytes() != crc_base62(body) {
        return Err(FormatError::Checksum);
    }
    Ok(ParsedToken {
        id: TokenId(token[..ID_LEN].to_owned()),
        secret: &token[ID_LEN..TOKEN_LEN - CHECKSUM_CHARS],
    })
}

/// A freshly generated token. The full text exists only here and is shown once.
pub struct NewToken {
    /// The whole token, to show once.
    pub token: String,
    /// Its id.
    pub id: TokenId,
}

impl fmt::Debug for NewToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewToken").field("id", &self.id).field("token", &"<redacted>").finish()
    }
}

impl NewToken {
    /// The secret part of the token, for hashing.
    pub fn secret(&self) -> &str {
        &self.token[ID_LEN..TOKEN_LEN - CHECKSUM_CHARS]
    }
}

/// Generates a new random token of the given kind from the OS random source.
pub fn generate(kind: TokenKind) -> NewToken {
    let mut body = String::with_capacity(TOKEN_LEN);
    body.push_str(kind.prefix());
    body.push_str(&random_base62(ID_CHARS + SECRET_CHARS));
    let checksum = crc_base62(&body);
    body.extend(checksum.iter().map(|&b| b as char));
    NewToken { id: TokenId(body[..ID_LEN].to_owned()), token: body }
}

/// `len` random base62 characters from the OS random source (ids, secrets).
pub fn random_base62(len: usize) -> String {
    let mut rng = rand::rngs::OsRng;
    (0..len).map(|_| BASE62[rng.gen_range(0..62)] as char).collect()
}

/// Appends the checksum to a token body (tests forge well-formed tokens with it).
#[cfg(test)]
pub(crate) fn with_checksum_for_tests(body: &str) -> String {
    let checksum = crc_base62(body);
    format!("{body}{}", String::from_utf8_lossy(&checksum))
}

fn is_base62(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

fn crc_base62(body: &str) -> [u8; CHECKSUM_CHARS] {
    let mut n = crc32fast::hash(body.as_bytes());
    let mut out = [b'0'; CHECKSUM_CHARS];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// Argon2id settings from config, with a constructor that validates them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Argon2Params {
    /// Memory cost in KiB.
    pub memory_kib: u32,
    /// Number of passes.
    pub iterations: u32,
    /// Degree of parallelism.
    pub parallelism: u32,
}

impl Default for Argon2Params {
    /// OWASP's recommended argon2id baseline: 19 MiB, 2 passes, 1 lane.
    fn default() -> Self {
        Argon2Params { memory_kib: 19 * 1024, iterations: 2, parallelism: 1 }
    }
}

impl Argon2Params {
    fn hasher(&self) -> Result<Argon2<'static>, argon2::Error> {
        let params = Params::new(self.memory_kib, self.iterations, self.parallelism, None)?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }

    /// Checks the parameters without hashing anything; the message names what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        self.hasher().map(|_| ()).map_err(|e| e.to_string())
    }
}

/// Hashes a secret into a PHC string (`$argon2id$v=19$m=...`). CPU-heavy: call off request threads.
pub fn hash_secret(secret: &str, params: &Argon2Params) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    let hasher = params.hasher().map_err(|_| argon2::password_hash::Error::ParamsMaxExceeded)?;
    Ok(hasher.hash_password(secret.as_bytes(), &salt)?.to_string())
}

/// Verifies a secret against a stored PHC string. The parameters come from the string itself, so
/// tokens hashed under older settings keep working. CPU-heavy: call off request threads.
pub fn verify_secret(secret: &str, phc: &str) -> bool {
    verify_secret_in(secret, phc, &mut Vec::new())
}

/// [`verify_secret`] in memory the caller keeps between runs (grown to the size the hash needs,
/// never shrunk), so that a run touches no new pages and frees nothing: an argon2 thread that
/// allocates, faults in and unmaps 19 MiB per run slows every other thread of the process.
/// Compares the result in constant time.
pub fn verify_secret_in(secret: &str, phc: &str, memory: &mut Vec<Block>) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else { return false };
    let (Some(expected), Some(salt)) = (hash.hash, hash.salt) else { return false };
    let (Ok(algorithm), Ok(version), Ok(params)) = (
        Algorithm::try_from(hash.algorithm),
        hash.version.map_or(Ok(Version::default()), Version::try_from),
        Params::try_from(&hash),
    ) else {
        return false;
    };
    let mut salt_bytes = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_bytes) else { return false };
    let blocks = params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    let hasher = Argon2::new(algorithm, version, params);
    // `Output` compares in constant time.
    Output::init_with(expected.len(), |out| {
        hasher
            .hash_password_into_with_memory(secret.as_bytes(), salt, out, &mut memory[..blocks])
            .map_err(Into::into)
    })
    .is_ok_and(|computed| computed == expected)
}

/// A keyed BLAKE3 digest of a secret, used to recognise a secret already checked with argon2.
///
/// The key is random per process, so the digests held in memory are useless outside it.
/// Equality on [`blake3::Hash`] is constant-time.
pub struct SecretDigester {
    key: [u8; 32],
}

impl SecretDigester {
    /// A digester with a fresh random key.
    pub fn new() -> Self {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill(&mut key);
        SecretDigester { key }
    }

    /// The digest of a secret.
    pub fn digest(&self, secret: &str) -> blake3::Hash {
        blake3::keyed_hash(&self.key, secret.as_bytes())
    }
}

impl Default for SecretDigester {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast_params() -> Argon2Params {
        Argon2Params { memory_kib: 256, iterations: 1, parallelism: 1 }
    }

    #[test]
    fn generated_tokens_parse_back() {
        for kind in [TokenKind::Pat, TokenKind::Service] {
            let new = generate(kind);
            assert_eq!(new.token.len(), TOKEN_LEN);
            let parsed = parse(&new.token).unwrap();
            assert_eq!(parsed.id, new.id);
            assert_eq!(parsed.id.kind(), kind);
            assert_eq!(parsed.secret, new.secret());
            assert!(new.token.starts_with(kind.prefix()));
        }
    }

    /// Fixed values, computed apart from this code (Python's `zlib.crc32` of the body, written in
    /// base62 `0-9A-Za-z`, most significant digit first, six digits): a secret scanner checking a
    /// candidate computes exactly this, so another CRC or alphabet order would break every scanner.
    #[test]
    fn the_checksum_is_the_bodys_crc32_in_base62() {
        for (body, checksum) in [
            ("tgp_a1B2c30123456789abcdefghijABCDEFGHIJ", "2By29E"),
            ("tgs_Zz9Yy8ABCDEFGHIJKLMNOPQRSTUVWXYZabcd", "1gUBqY"),
        ] {
            assert_eq!(with_checksum_for_tests(body), format!("{body}{checksum}"));
            assert!(parse(&format!("{body}{checksum}")).is_ok());
        }
    }

    #[test]
    fn a_whole_token_or_a_jwt_is_found_in_a_value_and_a_name_like_one_is_not() {
        let token = with_checksum_for_tests("tgp_a1B2c30123456789abcdefghijABCDEFGHIJ");
        let jwt = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2ln";
        for text in [
            format!("copy of {token}"),
            format!("{token}@acme.io"),
            format!("tgp_migration-{jwt}"),
            format!("{jwt}-tgp_migration"),
            format!("key: {jwt}."),
        ] {
            assert!(whole_credential_in(&text).is_some(), "{text}");
        }
        // A token's shape with a wrong checksum, a prefix in a word, dotted names.
        let mistyped = format!("{}x", &token[..TOKEN_LEN - 1]);
        for text in
            [mistyped.as_str(), "tgp_migration_helper", "eyJane.doe.example", "svc-eyJx.v1.2", "tgp_a1B2c3"]
        {
            assert_eq!(whole_credential_in(text), None, "{text}");
        }
    }

    #[test]
    fn redacted_cuts_a_token_or_a_jwt_and_leaves_names_alone() {
        let token = with_checksum_for_tests("tgp_a1B2c30123456789abcdefghijABCDEFGHIJ");
        assert_eq!(redacted(&format!("x-{token}")).as_deref(), Some("tgp_a1B2c3…"));
        assert_eq!(redacted("cb;jwt=eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2ln").as_deref(), Some("eyJ…"));
        // A JWT after a separator within a run, as a token is found anywhere in one.
        let jwt = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2ln";
        for (glued, cut) in [
            (format!("jwt_{jwt}"), "jwt_eyJ…"),
            (format!("id-{jwt}"), "id-eyJ…"),
            (format!("..{jwt}"), "..eyJ…"),
            (format!("x.eyJoe.{jwt}"), "x.eyJ…"),
        ] {
            assert_eq!(redacted(&glued).as_deref(), Some("eyJ…"), "{glued}");
            assert_eq!(redacted_within(&glued), cut, "{glued}");
        }
        // Many candidate starts, each but the last failing only at the run's end: read as a
        // JWT from the first start whose rest is one, and none when no rest is.
        let many = "-eyJ".repeat(16_000);
        assert_eq!(credential_in(&format!("{many}a.b.c")).map(|(at, _)| at), Some(1));
        assert_eq!(credential_in(&format!("{many}a..b.c")), None);
        assert_eq!(credential_in(&format!("x.b..c{many}a.b.c")).map(|(at, _)| at), Some(7));
        for name in ["heyJoe@acme.io", "tgp_a1B2c3", "reporting", "ann@example.com"] {
            assert_eq!(redacted(name), None, "{name}");
        }
        let message = format!("invalid type: string \"{token}\", expected i64 at line 1 column 9");
        assert_eq!(
            redacted_within(&message),
            "invalid type: string \"tgp_a1B2c3…\", expected i64 at line 1 column 9"
        );
        assert_eq!(
            redacted_within("[\"eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2ln\"] for heyJoe"),
            "[\"eyJ…\"] for heyJoe"
        );
        assert!(matches!(redacted_within("unknown field `colour`"), std::borrow::Cow::Borrowed(_)));
        // A full stop after an id, and an address that merely holds `eyJ`, are left alone.
        let near = format!("no token tgp_a1B2c3. {token} heyJoe.van.dam@acme.io");
        assert_eq!(redacted_within(&near), "no token tgp_a1B2c3. tgp_a1B2c3… heyJoe.van.dam@acme.io");
        // Every text comes back whole but for what is cut (runs of only stops and dashes too).
        for text in [".", "-.-", "x. .", "tgp_.", "eyJ..", "eyJa.b.", "..eyJa.b", "heyJa.b.c", ""] {
            let with_token = format!("{text} {token} {text}");
            let cut = redacted_within(&with_token);
            assert_eq!(cut, format!("{text} tgp_a1B2c3… {text}"), "{text:?}");
        }
    }

    #[test]
    fn secret_has_at_least_160_bits() {
        let bits = SECRET_CHARS as f64 * 62f64.log2();
        assert!(bits >= 160.0, "{bits}");
    }

    #[test]
    fn malformed_tokens_are_rejected_with_the_reason() {
        let good = generate(TokenKind::Pat).token;
        let flip = |i: usize| {
            let mut b = good.clone().into_bytes();
            b[i] = if b[i] == b'a' { b'b' } else { b'a' };
            String::from_utf8(b).unwrap()
        };
        let check = |input: &str, expected: FormatError| {
            assert_eq!(parse(input).err(), Some(expected), "{input}");
        };
        check("", FormatError::Length);
        check(&good[..TOKEN_LEN - 1], FormatError::Length);
        check(&format!("{good}x"), FormatError::Length);
        check(&format!("tgx_{}", &good[4..]), FormatError::Prefix);
        check(&format!("{}-{}", &good[..20], &good[21..]), FormatError::Alphabet);
        check(&format!("{}é{}", &good[..20], &good[22..]), FormatError::Alphabet);
        check(&flip(12), FormatError::Checksum);
        check(&flip(TOKEN_LEN - 1), FormatError::Checksum);
        // The kind is covered by the checksum too.
        check(&format!("tgs_{}", &good[4..]), FormatError::Checksum);
    }

    #[test]
    fn token_id_parsing() {
        let new = generate(TokenKind::Service);
        assert_eq!(TokenId::parse(new.id.as_str()), Some(new.id.clone()));
        assert_eq!(TokenId::parse("tgp_abc"), None);
        assert_eq!(TokenId::parse("xyz_abcdef"), None);
        assert_eq!(TokenId::parse("tgp_abc-ef"), None);
    }

    #[test]
    fn argon2_round_trip() {
        let new = generate(TokenKind::Pat);
        let phc = hash_secret(new.secret(), &fast_params()).unwrap();
        assert!(phc.starts_with("$argon2id$"));
        assert!(verify_secret(new.secret(), &phc));
        assert!(!verify_secret("wrong", &phc));
        assert!(!verify_secret(new.secret(), "not a hash"));
    }

    #[test]
    fn argon2_memory_kept_between_runs_of_different_sizes_gives_the_same_answers() {
        let small = Argon2Params { memory_kib: 64, iterations: 1, parallelism: 1 };
        let large = fast_params();
        let (a, b) = (generate(TokenKind::Pat), generate(TokenKind::Pat));
        let (small_phc, large_phc) =
            (hash_secret(a.secret(), &small).unwrap(), hash_secret(b.secret(), &large).unwrap());
        let mut memory = Vec::new();
        for _ in 0..2 {
            assert!(verify_secret_in(b.secret(), &large_phc, &mut memory));
            assert!(verify_secret_in(a.secret(), &small_phc, &mut memory), "reused larger memory");
            assert!(!verify_secret_in(b.secret(), &small_phc, &mut memory));
            assert!(!verify_secret_in(a.secret(), &large_phc, &mut memory));
        }
        assert_eq!(memory.len(), 256, "grown to the largest hash's blocks, never shrunk");
        assert!(!verify_secret_in(a.secret(), "$argon2id$v=19$m=64,t=1,p=1$bad", &mut memory));
    }

    #[test]
    fn digests_are_keyed() {
        let (a, b) = (SecretDigester::new(), SecretDigester::new());
        assert_eq!(a.digest("s"), a.digest("s"));
        assert_ne!(a.digest("s"), a.digest("t"));
        assert_ne!(a.digest("s"), b.digest("s"));
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let new = generate(TokenKind::Pat);
        assert!(!format!("{new:?}").contains(new.secret()));
        let parsed = parse(&new.token).unwrap();
        assert!(!format!("{parsed:?}").contains(new.secret()));
    }
}
