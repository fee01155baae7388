use super::*;

fn settings(keys: Vec<JwtKey>, signing: usize) -> JwtSettings {
    JwtSettings {
        issuer: "tollgate".into(),
        audience: "tollgate".into(),
        upstream_audience: "tollgate-upstream".into(),
        leeway: Duration::from_secs(0),
        default_ttl: Duration::from_secs(60),
        max_ttl: Duration::from_secs(600),
        upstream_ttl: Duration::from_secs(60),
        keys: keys.into_iter().map(Arc::new).collect(),
        signing,
    }
}

fn generated(kid: &str, alg: Algorithm) -> JwtKey {
    let pem = generate_key(alg).unwrap();
    JwtKey::load(kid, alg, KeyMaterial::Pem(&pem)).unwrap()
}

fn claims(exp_in: i64) -> EphemeralClaims {
    let now = crate::store::now_millis() / 1000;
    EphemeralClaims {
        iss: "tollgate".into(),
        aud: "tollgate".into(),
        sub: "alice@example.com".into(),
        iat: now,
        nbf: now,
        exp: now + exp_in,
        jti: "j1".into(),
        org: "acme".into(),
        project: "shop".into(),
        svc: "s_1".into(),
        tid: "tgs_abcdef".into(),
        tg: EPHEMERAL.into(),
        email: None,
        uid: None,
        attrs: Attributes::new(),
        scope: None,
        env: None,
    }
}

#[test]
fn each_algorithm_signs_and_verifies_and_publishes_its_key() {
    for (alg, kty) in [(Algorithm::EdDSA, "OKP"), (Algorithm::ES256, "EC")] {
        let s = settings(vec![generated("k", alg)], 0);
        let signed = claims(60);
        let token = s.sign(&signed).unwrap();
        let (got, _) = s.verify(&token).unwrap();
        assert_eq!(got, signed);
        let jwks = s.jwks();
        assert_eq!(jwks["keys"][0]["kty"], kty);
        assert_eq!(jwks["keys"][0]["kid"], "k");
        assert_eq!(jwks["keys"][0]["alg"], algorithm_name(alg));
    }
    let secret = [7u8; 32];
    let hs = JwtKey::load("h", Algorithm::HS256, KeyMaterial::Secret(&secret)).unwrap();
    let s = settings(vec![hs], 0);
    assert!(s.verify(&s.sign(&claims(60)).unwrap()).is_ok());
    assert_eq!(s.jwks()["keys"].as_array().map(Vec::len), Some(0), "secrets are never published");
}

#[test]
fn refusals() {
    let s = settings(vec![generated("a", Algorithm::EdDSA), generated("b", Algorithm::ES256)], 0);
    let good = s.sign(&claims(60)).unwrap();
    let check = |token: &str, want: JwtError| assert_eq!(s.verify(token).map(|_| ()), Err(want), "{token}");

    check("eyJhbGciOiJub25lIn0.e30.", JwtError::Malformed);
    check("not a jwt", JwtError::Malformed);
    check(&s.sign(&claims(-10)).unwrap(), JwtError::Expired);
    // At `exp` itself (no leeway here), as a cached credential is (`still_valid`).
    check(&s.sign(&claims(0)).unwrap(), JwtError::Expired);
    let mut identity = claims(60);
    identity.tg = IDENTITY.into();
    check(&s.sign(&identity).unwrap(), JwtError::Claims);
    let mut other_aud = claims(60);
    other_aud.aud = "tollgate-upstream".into();
    check(&s.sign(&other_aud).unwrap(), JwtError::Claims);
    // What minting never signs (signed elsewhere with a shared key): claims that would travel in
    // a header as they are must be header text.
    for unfit in [
        EphemeralClaims { sub: "a\r\nx-auth-role: admin".into(), ..claims(60) },
        EphemeralClaims { sub: String::new(), ..claims(60) },
        EphemeralClaims { jti: "é".into(), ..claims(60) },
        EphemeralClaims { email: Some("x".repeat(300)), ..claims(60) },
    ] {
        check(&s.sign(&unfit).unwrap(), JwtError::Claims);
    }

    // A flipped signature byte, and a payload swapped under the original signature.
    let (head, sig) = good.rsplit_once('.').unwrap();
    let mut bad_sig = sig.as_bytes().to_vec();
    bad_sig[3] = if bad_sig[3] == b'A' { b'B' } else { b'A' };
    check(&format!("{head}.{}", String::from_utf8(bad_sig).unwrap()), JwtError::BadSignature);
    let mut richer = claims(60);
    richer.project = "other".into();
    let forged_payload = s.sign(&richer).unwrap();
    let parts: Vec<&str> = good.split('.').collect();
    let other: Vec<&str> = forged_payload.split('.').collect();
    check(&format!("{}.{}.{}", parts[0], other[1], parts[2]), JwtError::BadSignature);

    // A header naming the other key's algorithm, and a kid nobody configured.
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("a".into());
    let b_key = &s.key("b").unwrap().encoding;
    let confused = jsonwebtoken::encode(&header, &claims(60), b_key.as_ref().unwrap()).unwrap();
    check(&confused, JwtError::WrongAlgorithm);
    header.kid = Some("nope".into());
    check(
        &jsonwebtoken::encode(&header, &claims(60), b_key.as_ref().unwrap()).unwrap(),
        JwtError::UnknownKey,
    );
}

#[test]
fn a_public_key_verifies_but_cannot_sign() {
    let pem = generate_key(Algorithm::EdDSA).unwrap();
    let private = JwtKey::load("k", Algorithm::EdDSA, KeyMaterial::Pem(&pem)).unwrap();
    let signer = settings(vec![private], 0);
    let token = signer.sign(&claims(60)).unwrap();

    // SubjectPublicKeyInfo of the same key, as `openssl pkey -pubout` writes it.
    let x = URL_SAFE_NO_PAD.decode(signer.jwks()["keys"][0]["x"].as_str().unwrap()).unwrap();
    let spki = [ED25519_SPKI, &x].concat();
    let public_pem = pem::encode(&pem::Pem::new("PUBLIC KEY", spki));
    let public = JwtKey::load("k", Algorithm::EdDSA, KeyMaterial::Pem(&public_pem)).unwrap();
    assert!(!public.can_sign());
    let verifier = settings(vec![public], 0);
    assert!(verifier.verify(&token).is_ok());
    assert!(verifier.sign(&claims(60)).is_err());
    assert!(JwtKey::load("k", Algorithm::ES256, KeyMaterial::Pem(&public_pem)).is_err());
}

#[test]
fn cached_claims_fail_once_their_key_is_gone_or_changed() {
    let s = settings(vec![generated("a", Algorithm::EdDSA)], 0);
    let (c, fp) = s.verify(&s.sign(&claims(60)).unwrap()).unwrap();
    let now = crate::store::now_millis() / 1000;
    assert_eq!(s.still_valid(&c, &fp, now), Ok(()));
    assert_eq!(s.still_valid(&c, &fp, now + 61), Err(JwtError::Expired));
    let replaced = settings(vec![generated("a", Algorithm::EdDSA)], 0);
    assert_eq!(replaced.still_valid(&c, &fp, now), Err(JwtError::UnknownKey));
}

#[test]
fn key_material_must_fit_the_algorithm() {
    let ed = generate_key(Algorithm::EdDSA).unwrap();
    assert!(JwtKey::load("k", Algorithm::ES256, KeyMaterial::Pem(&ed)).is_err());
    assert!(JwtKey::load("k", Algorithm::HS256, KeyMaterial::Pem(&ed)).is_err());
    assert!(JwtKey::load("k", Algorithm::HS256, KeyMaterial::Secret(b"short")).is_err());
    assert!(JwtKey::load("k", Algorithm::EdDSA, KeyMaterial::Pem("garbage")).is_err());
    assert!(generate_key(Algorithm::RS256).is_err());
}

#[test]
fn jwt_shape() {
    assert!(looks_like_jwt("eyJa.eyJb.c"));
    assert!(!looks_like_jwt("tgp_abcdef0123"));
    assert!(!looks_like_jwt("eyJa.b"));
}

/// A 2048-bit RSA key made with `openssl genpkey` for this test only (ring cannot generate RSA keys).
const TEST_RSA_KEY: &str = include_str!("test-rsa-2048.pem");

#[test]
fn rs256_keys_sign_verify_and_publish_modulus_and_exponent() {
    let key = JwtKey::load("r", Algorithm::RS256, KeyMaterial::Pem(TEST_RSA_KEY)).unwrap();
    let s = settings(vec![key], 0);
    let token = s.sign(&claims(60)).unwrap();
    assert!(s.verify(&token).is_ok());
    let jwk = &s.jwks()["keys"][0];
    assert_eq!((jwk["kty"].as_str(), jwk["e"].as_str()), (Some("RSA"), Some("AQAB")));
    assert_eq!(URL_SAFE_NO_PAD.decode(jwk["n"].as_str().unwrap()).unwrap().len(), 256);
    // HS256 over the RSA key's PEM under the same kid is refused.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("r".into());
    let confused =
        jsonwebtoken::encode(&header, &claims(60), &EncodingKey::from_secret(TEST_RSA_KEY.as_bytes()))
            .unwrap();
    assert_eq!(s.verify(&confused).map(|_| ()), Err(JwtError::WrongAlgorithm));
}

#[test]
fn a_credential_longer_than_max_ttl_now_is_refused_even_once_cached() {
    let mut s = settings(vec![generated("a", Algorithm::EdDSA)], 0);
    let long = claims(3600);
    assert_eq!(s.verify(&s.sign(&long).unwrap()).map(|_| ()), Err(JwtError::Claims), "1 h over 10 min");
    let ok = claims(600);
    let (verified, key) = s.verify(&s.sign(&ok).unwrap()).unwrap();
    let now = verified.iat;
    assert_eq!(s.still_valid(&verified, &key, now), Ok(()));
    // Lowered after minting: the cached verdict follows the config.
    s.max_ttl = Duration::from_secs(60);
    assert_eq!(s.still_valid(&verified, &key, now), Err(JwtError::Claims));
    s.max_ttl = Duration::from_secs(600);
    // And the other cached checks: not yet valid, another issuer, another audience.
    for change in [
        |c: &mut EphemeralClaims| c.nbf += 120,
        |c: &mut EphemeralClaims| c.iss = "someone".into(),
        |c: &mut EphemeralClaims| c.aud = "tollgate-upstream".into(),
    ] {
        let mut c = verified.clone();
        change(&mut c);
        assert_eq!(s.still_valid(&c, &key, now), Err(JwtError::Claims));
    }
}

#[test]
fn a_lifetime_dated_ahead_is_refused_and_a_far_expiry_never_overflows() {
    // Signed by another holder of the key (a shared HS256 secret, say): a short `exp - iat` whose
    // `iat` lies in the future stretches the credential's life past `max_ttl` from now.
    let mut s = settings(vec![generated("a", Algorithm::EdDSA)], 0);
    s.leeway = Duration::from_secs(5);
    let mut ahead = claims(10 * 365 * 86_400);
    ahead.iat = ahead.exp - 60;
    assert_eq!(s.verify(&s.sign(&ahead).unwrap()).map(|_| ()), Err(JwtError::Claims));
    // Dated ahead alone, with an expiry well within `max_ttl` from now: refused too.
    let mut soon = claims(180);
    soon.iat += 120;
    assert_eq!(s.verify(&s.sign(&soon).unwrap()).map(|_| ()), Err(JwtError::Claims));
    let mut last = claims(0);
    last.exp = i64::MAX;
    last.iat = i64::MAX - 60;
    assert_eq!(s.verify(&s.sign(&last).unwrap()).map(|_| ()), Err(JwtError::Claims));
    // Were such claims ever cached, their later checks refuse them without overflowing.
    let (verified, key) = s.verify(&s.sign(&claims(60)).unwrap()).unwrap();
    let now = verified.iat;
    let far = EphemeralClaims { exp: i64::MAX, iat: i64::MAX - 60, ..verified.clone() };
    assert_eq!(s.still_valid(&far, &key, now), Err(JwtError::Claims));
    let since_ever = EphemeralClaims { nbf: i64::MIN, ..verified.clone() };
    assert_eq!(s.still_valid(&since_ever, &key, now), Ok(()));
}

#[test]
fn keys_not_generated_here_say_how_to_make_them() {
    let hs = generate_key(Algorithm::HS256).unwrap_err();
    assert!(hs.contains("openssl rand") && hs.contains("secret_file"), "{hs}");
    let rs = generate_key(Algorithm::RS256).unwrap_err();
    assert!(rs.contains("openssl genpkey"), "{rs}");
}
