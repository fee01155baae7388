//! Ephemeral credentials: a service mints a short-lived JWT for one of its end users, on one project,
//! never with more rights than the service itself holds there through the token it calls with.

use serde::{Deserialize, Serialize};

use super::{
    check_attributes, check_email, once_each, Actor, Lifecycle, LifecycleError, Result, EMPTY_ENVIRONMENTS,
};
use crate::jwt::{EphemeralClaims, EPHEMERAL, MAX_JWT_LEN};
use crate::policy::PermSet;
use crate::proxy::headers::attr_suffix;
use crate::store::{format_millis, now_millis, Attributes, Stored, User, UserStatus};
use crate::token;

/// What a service asks for.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsRequest {
    /// The end user's attributes (injected for the upstream).
    pub attributes: Option<Attributes>,
    /// The end user's email, instead of attributes: the attributes are then those of the org's
    /// user with that email, if there is one, plus `email` and `domain`.
    pub user_email: Option<String>,
    /// The end user's id, as the upstream should see it (`X-Auth-Subject: ephemeral:<subject>`);
    /// defaults to the email, then to the credential's id.
    pub subject: Option<String>,
    /// Lifetime; defaults to `jwt.default_ttl`, capped by `jwt.max_ttl`.
    pub ttl_seconds: Option<i64>,
    /// A scope preset name.
    pub scope: Option<String>,
    /// An explicit permission list instead of a preset.
    pub permissions: Option<Vec<String>>,
    /// Environments of the project it may be used in.
    pub environments: Option<Vec<String>>,
}

/// A minted credential. The token is shown once; nothing of it is stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IssuedCredential {
    /// The JWT.
    pub token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Its id (`jti`), shown as `X-Auth-Token-Id` and in the audit log.
    pub id: String,
    /// `ephemeral:<subject>` is what the upstream sees.
    pub subject: String,
    /// Org.
    pub org: String,
    /// Project.
    pub project: String,
    /// Scope permissions, if narrowed (absent otherwise, as the OpenAPI document says).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<Vec<String>>,
    /// Environments, if restricted (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environments: Option<Vec<String>>,
    /// Expiry (RFC 3339).
    pub expires_at: String,
    /// Seconds until expiry.
    pub expires_in: i64,
}

/// The length of a credential's id (its `jti`, shown as `X-Auth-Token-Id`).
pub const CREDENTIAL_ID_LEN: usize = 16;

/// Whether `id` has the form of a credential's id.
pub fn is_credential_id(id: &str) -> bool {
    id.len() == CREDENTIAL_ID_LEN && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn header_text(what: &str, value: &str) -> Result<()> {
    if !crate::jwt::is_claim_text(value) {
        return Err(LifecycleError::Invalid(format!(
            "{what} must be 1 to 256 printable ASCII characters, with no space at either end (it \
             travels in a header, whose value an upstream reads without them)"
        )));
    }
    Ok(())
}

impl Lifecycle<'_> {
    /// The org's user with `email`, if any: credentials minted for them carry their id, so that
    /// suspension stops everything done on their behalf, now (refused here) and on every use.
    async fn org_user(&self, org: &str, email: &str) -> Result<Option<User>> {
        match self.store.find_user_by_email(org, email).await? {
            Some(user) if user.status != UserStatus::Active => {
                Err(LifecycleError::Forbidden(format!("user {email} is suspended")))
            }
            user => Ok(user.map(Stored::into_inner)),
        }
    }

    /// Mints an ephemeral credential for an end user of the calling service.
    pub async fn issue_credentials(
        &self,
        actor: &Actor,
        org: &str,
        project: &str,
        req: CredentialsRequest,
    ) -> Result<IssuedCredential> {
        actor.require_org(org)?;
        let (Some(service_id), Some(parent)) = (&actor.service_id, &actor.token_id) else {
            return Err(LifecycleError::Forbidden(
                "ephemeral credentials are issued with a service token (tgs_...)".into(),
            ));
        };
        let jwt = self.config.jwt.as_ref().ok_or_else(|| {
            LifecycleError::Invalid(
                "this gateway has no `jwt` section: it cannot sign credentials (`tollgate keygen` makes a \
                 signing key and prints its `jwt.keys` line)"
                    .into(),
            )
        })?;
        let project_envs =
            self.config.orgs.get(org).and_then(|o| o.projects.get(project)).ok_or_else(|| {
                let (project, org) = (super::shown(project), super::shown(org));
                LifecycleError::NotFound(format!("project {project:?} not found in org {org:?}"))
            })?;

        // What the service holds on the project through this token; a credential gets no more.
        let policy = &self.config.policy;
        let held = actor.permissions_for(self.config, actor.roles.on(project));
        if held == PermSet::EMPTY {
            return Err(LifecycleError::Forbidden(format!(
                "the service has no permissions on project {project:?}"
            )));
        }
        let scope = self.requested_scope(req.scope, req.permissions)?;
        if let Some(s) = &scope {
            let wanted = policy.set_of(&s.permissions);
            if !held.contains(wanted) {
                return Err(LifecycleError::Forbidden(format!(
                    "the credential would have more rights ({}) than {} on project {project:?} ({})",
                    policy.names_of(wanted),
                    if actor.scope.is_some() {
                        "this token of the service holds"
                    } else {
                        "the service holds"
                    },
                    policy.names_of(held)
                )));
            }
        }
        // Each once (the list travels in the token).
        let environments = req.environments.map(|mut envs| {
            once_each(&mut envs);
            envs
        });
        if let Some(envs) = &environments {
            if envs.is_empty() {
                return Err(LifecycleError::Invalid(EMPTY_ENVIRONMENTS.into()));
            }
            if let Some(bad) = envs.iter().find(|e| !project_envs.contains(e)) {
                return Err(LifecycleError::Invalid(format!(
                    "unknown environment {bad:?} of project {project:?}; it has {}",
                    project_envs.join(", ")
                )));
            }
            if let Some(bad) =
                envs.iter().find(|e| actor.environments.as_ref().is_some_and(|m| !m.contains(e)))
            {
                return Err(LifecycleError::Forbidden(format!(
                    "the service token may not be used in environment {bad:?}"
                )));
            }
        }

        // Unasked, it is as narrow as the token minting it (which narrows it on every use anyway),
        // as a PAT made with a narrowed token is, and says so; the service's role still caps it.
        let scope = scope.map(|s| s.permissions).or_else(|| actor.scope.clone());
        let environments = match (environments, &actor.environments) {
            (None, Some(mine)) => {
                let here: Vec<String> = mine.iter().filter(|e| project_envs.contains(e)).cloned().collect();
                if here.is_empty() {
                    return Err(LifecycleError::Forbidden(format!(
                        "the service token may be used only in {}, none of them an environment of project {project:?}",
                        mine.join(", ")
                    )));
                }
                Some(here)
            }
            (environments, _) => environments,
        };

        let max = jwt.max_ttl.as_secs() as i64;
        let ttl = match req.ttl_seconds {
            None => jwt.default_ttl.as_secs() as i64,
            Some(t) if t <= 0 => {
                return Err(LifecycleError::Invalid(format!("ttl_seconds must be positive, got {t}")))
            }
            Some(t) if t > max => {
                return Err(LifecycleError::Invalid(format!(
                    "ttl_seconds {t} is above the maximum of {max} seconds (jwt.max_ttl)"
                )))
            }
            Some(t) => t,
        };

        let (attrs, email, uid) = match (req.attributes, req.user_email) {
            (Some(attrs), None) => {
                // The caller's own; a stored user's were checked when stored (and the signed
                // credential's length is checked below either way).
                check_attributes(&attrs)?;
                // The one key (if any) that travels as the email attribute, however spelled: it
                // must be an address, checked as `user_email` is, so that no spelling of a
                // user's address (`Email`, a padded one) escapes the binding below.
                // Only one: a second, which no header carries (a list, a value with a tab), would
                // reach upstreams reading `X-Auth-Attributes` unchecked and unbound.
                let mut spellings = attrs.iter().filter(|(k, _)| attr_suffix(k).eq("email".chars()));
                let first = spellings.next();
                if let (Some((a, _)), Some((b, _))) = (first, spellings.next()) {
                    return Err(LifecycleError::Invalid(format!(
                        "attributes {a:?} and {b:?} are both the email attribute; keep one"
                    )));
                }
                let email = match first {
                    None => None,
                    Some((_, serde_json::Value::String(e))) => {
                        check_email(e)?;
                        Some(e.clone())
                    }
                    Some((key, _)) => {
                        return Err(LifecycleError::Invalid(format!(
                            "the attribute {key:?} must be an email address (a string)"
                        )))
                    }
                };
                // An `email` naming an org user is that user, as with `user_email`, and is
                // spelled as stored: the user reaches upstreams as one address, by PAT or by
                // credential, however the caller wrote it.
                let mut attrs = attrs;
                let (email, uid) = match email {
                    Some(e) => match self.org_user(org, &e).await? {
                        Some(user) => {
                            if let Some((_, value)) =
                                attrs.iter_mut().find(|(k, _)| attr_suffix(k).eq("email".chars()))
                            {
                                *value = user.email.clone().into();
                            }
                            (Some(user.email), Some(user.id))
                        }
                        None => (Some(e), None),
                    },
                    None => (None, None),
                };
                (attrs, email, uid)
            }
            (None, Some(email)) => {
                check_email(&email)?;
                // An org user's address as stored, however the caller spelled it.
                let (mut attrs, uid, email) = match self.org_user(org, &email).await? {
                    Some(user) => (user.attributes, Some(user.id), user.email),
                    None => (Attributes::new(), None, email),
                };
                // As a PAT's (`AttributeView`): the user's own key, however spelled, wins.
                let mut add = |key: &str, value: &str| {
                    if !attrs.keys().any(|k| attr_suffix(k).eq(attr_suffix(key))) {
                        attrs.insert(key.to_string(), value.into());
                    }
                };
                add("email", &email);
                if let Some((_, domain)) = email.rsplit_once('@') {
                    add("domain", domain);
                }
                (attrs, Some(email), uid)
            }
            _ => {
                return Err(LifecycleError::Invalid(
                    "give the end user's `attributes` or their `user_email`, one of the two".into(),
                ))
            }
        };
        if let Some(e) = &email {
            header_text("the email", e)?;
        }
        // A subject naming an org user would reach upstreams as that user (`X-Auth-Subject:
        // ephemeral:<address>`, as a credential bound to them does) without the binding that stops
        // it when they are suspended or removed: only the bound user's own address may be it.
        // Trimmed as an upstream's HTTP parser trims the header value.
        if let Some(subject) = req.subject.as_deref().map(str::trim).filter(|s| check_email(s).is_ok()) {
            if let Some(user) = self.org_user(org, subject).await? {
                if uid.as_ref() != Some(&user.id) {
                    return Err(LifecycleError::Invalid(format!(
                        "the subject {subject:?} is org user {}'s address: send it as `user_email` (or \
                         the `email` attribute), which binds the credential to that user",
                        user.email
                    )));
                }
            }
        }
        let jti = token::random_base62(CREDENTIAL_ID_LEN);
        let sub = req.subject.or_else(|| email.clone()).unwrap_or_else(|| jti.clone());
        header_text("the subject", &sub)?;
        crate::lifecycle::refuse_credential("the subject", &sub)?;

        let now = now_millis() / 1000;
        // It stops with the token that minted it anyway (its expiry, or the end of its
        // rotation's grace): say so in its own.
        let parent_expiry = match self.store.get_token(parent).await? {
            Some(t) => {
                t.expires_at.into_iter().chain(t.revoked.as_ref().map(|r| r.at)).min().map(|ms| ms / 1000)
            }
            None => None,
        };
        let exp = parent_expiry.map_or(now + ttl, |end| end.min(now + ttl));
        // The token ended after it authenticated this call: a credential dead at birth is no success.
        if exp <= now {
            return Err(LifecycleError::Forbidden(
                "the calling token has just expired or been revoked; mint with a token that is in force"
                    .into(),
            ));
        }
        let claims = EphemeralClaims {
            iss: jwt.issuer.clone(),
            aud: jwt.audience.clone(),
            sub,
            iat: now,
            nbf: now,
            exp,
            jti,
            org: org.to_string(),
            project: project.to_string(),
            svc: service_id.clone(),
            tid: parent.to_string(),
            tg: EPHEMERAL.to_string(),
            email,
            uid,
            attrs,
            scope,
            env: environments,
        };
        let token = jwt.sign(&claims).map_err(|e| LifecycleError::Invalid(format!("signing failed: {e}")))?;
        // One the gateway would refuse to read is no credential.
        if token.len() > MAX_JWT_LEN {
            return Err(LifecycleError::Invalid(format!(
                "the credential would be {} bytes long, over the {MAX_JWT_LEN} the gateway reads: \
                 send fewer or shorter attributes",
                token.len()
            )));
        }
        let expires_at = format_millis(claims.exp * 1000);
        let mut audit = actor.audit("credentials.issue", format!("project:{project}"));
        audit.token_id = Some(parent.to_string());
        audit.details = serde_json::json!({
            "id": claims.jti, "subject": claims.sub, "expires_at": expires_at,
            "permissions": claims.scope, "environments": claims.env,
        });
        self.store.append_credentials_audit(&audit).await?;
        Ok(IssuedCredential {
            token,
            token_type: "Bearer".into(),
            id: claims.jti,
            subject: format!("ephemeral:{}", claims.sub),
            org: claims.org,
            project: claims.project,
            permissions: claims.scope,
            environments: claims.env,
            expires_at,
            expires_in: claims.exp - now,
        })
    }
}
