//! Lifecycle operations shared by `bootstrap`, the admin API and tests: creating orgs, users,
//! services and tokens. Secrets are hashed off the async threads and shown only in the return value.

use std::collections::BTreeMap;

use crate::policy::Role;
use crate::store::{
    now_millis, Attributes, Millis, Org, Owner, Scope, Service, Store, StoreError, TokenRecord, User,
    UserStatus,
};
use crate::token::{self, Argon2Params, NewToken, TokenKind};

/// A lifecycle failure.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The store refused or could not be reached.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Hashing the secret failed (bad argon2 parameters).
    #[error("hashing the token secret failed: {0}")]
    Hash(String),
}

/// What a new token may do.
#[derive(Debug, Clone, Default)]
pub struct TokenSpec {
    /// Name shown in lists.
    pub display_name: Option<String>,
    /// Narrowing below the owner's role.
    pub scope: Option<Scope>,
    /// Environments it may be used in.
    pub environments: Option<Vec<String>>,
    /// Expiry.
    pub expires_at: Option<Millis>,
}

/// Generates, hashes and stores a token for `owner`; returns the token text (to show once).
pub async fn issue_token(
    store: &Store,
    argon2: Argon2Params,
    org: &str,
    owner: Owner,
    spec: TokenSpec,
) -> Result<(NewToken, TokenRecord), LifecycleError> {
    let kind = match owner {
        Owner::User(_) => TokenKind::Pat,
        Owner::Service(_) => TokenKind::Service,
    };
    let new = token::generate(kind);
    let secret = new.secret().to_owned();
    let hash = tokio::task::spawn_blocking(move || token::hash_secret(&secret, &argon2))
        .await
        .map_err(|e| LifecycleError::Hash(e.to_string()))?
        .map_err(|e| LifecycleError::Hash(e.to_string()))?;
    let record = TokenRecord {
        id: new.id.clone(),
        kind,
        org: org.to_string(),
        owner,
        display_name: spec.display_name,
        secret_hash: hash,
        scope: spec.scope,
        environments: spec.environments,
        created_at: now_millis(),
        expires_at: spec.expires_at,
        revoked: None,
    };
    store.insert_token(&record).await?;
    Ok((new, record))
}

/// Creates the org if it does not exist yet.
pub async fn ensure_org(store: &Store, name: &str) -> Result<(), LifecycleError> {
    if store.get_org(name).await?.is_none() {
        match store.create_org(&Org { name: name.to_string(), created_at: now_millis() }).await {
            Ok(()) | Err(StoreError::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Creates an active user.
pub async fn create_user(
    store: &Store,
    org: &str,
    email: &str,
    org_role: Role,
    project_roles: BTreeMap<String, Role>,
    attributes: Attributes,
) -> Result<User, LifecycleError> {
    let user = User {
        id: format!("u_{}", token::random_base62(12)),
        org: org.to_string(),
        email: email.to_string(),
        status: UserStatus::Active,
        org_role,
        project_roles,
        attributes,
        created_at: now_millis(),
    };
    store.create_user(&user).await?;
    Ok(user)
}

/// Creates a service.
pub async fn create_service(
    store: &Store,
    org: &str,
    name: &str,
    org_role: Option<Role>,
    project_roles: BTreeMap<String, Role>,
    attributes: Attributes,
    created_by: Option<String>,
) -> Result<Service, LifecycleError> {
    let service = Service {
        id: format!("s_{}", token::random_base62(12)),
        org: org.to_string(),
        name: name.to_string(),
        org_role,
        project_roles,
        attributes,
        created_by,
        created_at: now_millis(),
    };
    store.create_service(&service).await?;
    Ok(service)
}

/// The org's first admin and a token for them.
pub async fn bootstrap(
    store: &Store,
    argon2: Argon2Params,
    org: &str,
    email: &str,
) -> Result<(User, NewToken), LifecycleError> {
    ensure_org(store, org).await?;
    let user = create_user(store, org, email, Role::Admin, BTreeMap::new(), Attributes::new()).await?;
    let spec = TokenSpec { display_name: Some("bootstrap".into()), ..TokenSpec::default() };
    let (token, _) = issue_token(store, argon2, org, Owner::User(user.id.clone()), spec).await?;
    Ok((user, token))
}
