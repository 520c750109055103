//! Sign-in, sessions, CSRF, API tokens, the role matrix and preview access, end to end: a
//! browser-like client signs in through the fake GitHub's OAuth endpoints and drives the API as
//! a user would.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use understudy_adapters::github::oauth::{encode_component, OAuthApp};
use understudy_adapters::preview::token::PreviewSigner;
use understudy_adapters::secrets::SecretKey;
use understudy_domain::account::{AccountCommand, AccountKind};
use understudy_domain::ids::{AccountId, ProjectId};
use understudy_domain::permissions::{Permission, Role};
use understudy_domain::project::{EntrypointRule, ProjectCommand};
use understudy_domain::values::{BranchName, CommitSha, Entrypoint, ProjectName, RepoFullName, Target};
use understudy_tests::fake_github::{FakeGitHub, OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET};
use understudy_tests::fixtures::meta;
use understudy_tests::{eventually, TestEnv};
use uuid::Uuid;

const DOMAIN: &str = "preview.auth.test";
pub(crate) const REPO: &str = "acme/web";

pub(crate) struct App {
    pub(crate) env: TestEnv,
    pub(crate) github: FakeGitHub,
    pub(crate) addr: std::net::SocketAddr,
    signer: Arc<PreviewSigner>,
    cancel: CancellationToken,
    _tasks: JoinSet<anyhow::Result<()>>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

pub(crate) async fn start() -> App {
    let mut env = TestEnv::new().await;
    let github = FakeGitHub::start().await;
    github.set_repo(REPO, 4401, "main", &[]);
    env.runtime.oauth = Some(OAuthApp::new(OAUTH_CLIENT_ID.into(), OAUTH_CLIENT_SECRET.into(), github.base_url(), github.base_url()));
    env.runtime.access_ttl = Duration::from_millis(500);
    let key = std::fs::read_to_string(format!("{}/fixtures/github-app-test-key.pem", env!("CARGO_MANIFEST_DIR"))).expect("test key");
    let config = understudy_adapters::github::client::GitHubConfig {
        api_url: github.base_url(),
        app_id: understudy_tests::fake_github::APP_ID,
        private_key_pem: key,
    };
    env.runtime.github.app = Some(understudy_adapters::github::client::GitHub::new(&config).expect("GitHub client"));
    let signer = Arc::new(PreviewSigner::generate("understudy-test"));
    let mut preview = (*env.runtime.preview).clone();
    preview.signer = Some(signer.clone());
    preview.secret_key = Some(SecretKey::from_bytes(&[9u8; 32]).expect("key"));
    preview.public = false;
    preview.preview_domain = DOMAIN.into();
    env.runtime.preview = Arc::new(preview);
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();
    env.runtime.spawn_relay(cancel.clone(), &mut tasks);
    env.runtime.spawn_projectors(understudy_projections::all(), cancel.clone(), &mut tasks);
    let addr = env.runtime.serve_api("127.0.0.1:0".parse().expect("addr"), cancel.clone(), &mut tasks).await.expect("serve");
    App { env, github, addr, signer, cancel, _tasks: tasks }
}

impl App {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A team owned by `owner` (a GitHub user id) with the project of [`REPO`].
    pub(crate) async fn team_with_project(&self, owner_github_id: u64) -> (AccountId, ProjectId) {
        let account = AccountId(Uuid::new_v4());
        let owner = understudy_adapters::github::user_id(owner_github_id);
        let store = &self.env.runtime.store;
        let create = AccountCommand::Create {
            account_id: account,
            kind: AccountKind::Team { name: "acme".into() },
            creator: owner,
            at: chrono::Utc::now(),
        };
        store.accounts.execute(account.0, create, meta()).await.expect("team");
        let project = understudy_adapters::github::project_id(4401);
        let command = ProjectCommand::Create {
            project_id: project,
            account_id: account,
            name: ProjectName::parse("web").expect("name"),
            repository: RepoFullName::parse(REPO).expect("repo"),
            production_branch: BranchName::parse("main").expect("branch"),
            entrypoints: EntrypointRule::Detect,
            at: chrono::Utc::now(),
        };
        store.projects.execute(project.0, command, meta()).await.expect("project");
        (account, project)
    }
}

/// A browser: keeps cookies per host, follows redirects itself, and reaches preview hosts through
/// the API's address with their own `Host`.
struct Browser {
    http: reqwest::Client,
    addr: std::net::SocketAddr,
    /// host → name → value
    cookies: HashMap<String, HashMap<String, String>>,
    /// Every `Set-Cookie` seen, as sent.
    set_cookies: Vec<String>,
}

struct Page {
    status: u16,
    url: String,
    location: Option<String>,
    body: String,
}

impl Browser {
    fn new(addr: std::net::SocketAddr) -> Self {
        let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client");
        Self { http, addr, cookies: HashMap::new(), set_cookies: Vec::new() }
    }

    /// Another browser with the same cookies.
    fn fork(&self) -> Browser {
        Browser { http: self.http.clone(), addr: self.addr, cookies: self.cookies.clone(), set_cookies: vec![] }
    }

    fn cookie(&self, host: &str, name: &str) -> Option<String> {
        self.cookies.get(host).and_then(|c| c.get(name)).cloned()
    }

    fn host(&self) -> String {
        self.addr.to_string()
    }

    /// One request; `url` may name a preview host, which is reached through the API's address.
    async fn request(&mut self, method: reqwest::Method, url: &str, headers: &[(&str, String)], body: Option<Value>) -> Page {
        let parsed = reqwest::Url::parse(url).expect("absolute URL");
        let host = match parsed.port() {
            Some(port) => format!("{}:{port}", parsed.host_str().unwrap_or_default()),
            None => parsed.host_str().unwrap_or_default().to_string(),
        };
        let target = if host.ends_with(DOMAIN) {
            let mut direct = parsed.clone();
            direct.set_host(Some("127.0.0.1")).expect("host");
            direct.set_port(Some(self.addr.port())).expect("port");
            direct
        } else {
            parsed.clone()
        };
        let mut request = self.http.request(method, target).header("host", &host).header("accept", "text/html");
        if let Some(jar) = self.cookies.get(&host) {
            let cookie: Vec<String> = jar.iter().map(|(k, v)| format!("{k}={v}")).collect();
            if !cookie.is_empty() {
                request = request.header("cookie", cookie.join("; "));
            }
        }
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        for value in response.headers().get_all("set-cookie") {
            let text = value.to_str().expect("ascii").to_string();
            let (pair, attributes) = text.split_once(';').unwrap_or((&text, ""));
            let (name, value) = pair.split_once('=').expect("name=value");
            let jar = self.cookies.entry(host.clone()).or_default();
            if attributes.contains("Max-Age=0") {
                jar.remove(name);
            } else {
                jar.insert(name.to_string(), value.to_string());
            }
            self.set_cookies.push(text);
        }
        let status = response.status().as_u16();
        let location = response.headers().get("location").map(|l| l.to_str().expect("ascii").to_string());
        let location = location.map(|l| if l.starts_with('/') { format!("http://{host}{l}") } else { l });
        Page { status, url: url.to_string(), location, body: response.text().await.unwrap_or_default() }
    }

    async fn get(&mut self, url: &str) -> Page {
        self.request(reqwest::Method::GET, url, &[], None).await
    }

    /// GETs `url` and follows redirects to the end.
    async fn visit(&mut self, url: &str) -> Page {
        let mut page = self.get(url).await;
        for _ in 0..12 {
            match (&page.location, page.status) {
                (Some(next), 301..=308) => {
                    let next = next.clone();
                    page = self.get(&next).await;
                }
                _ => return page,
            }
        }
        panic!("too many redirects from {url}");
    }

    async fn sign_in(&mut self, login: &str, return_to: &str) -> Page {
        let url = format!("http://{}/auth/github/login?login={login}&return_to={}", self.host(), encode_component(return_to));
        self.visit(&url).await
    }

    fn csrf(&self) -> String {
        self.cookie(&self.host(), "understudy_csrf").expect("a CSRF cookie after sign-in")
    }

    /// GraphQL over HTTP with the session cookie (and the CSRF token unless `csrf` is false).
    async fn graphql(&mut self, query: &str, variables: Value, csrf: bool) -> (u16, Value) {
        let headers = if csrf { vec![("x-csrf-token", self.csrf())] } else { vec![] };
        let url = format!("http://{}/graphql", self.host());
        let page = self.request(reqwest::Method::POST, &url, &headers, Some(json!({ "query": query, "variables": variables }))).await;
        (page.status, serde_json::from_str(&page.body).unwrap_or(Value::Null))
    }
}

async fn bearer(addr: std::net::SocketAddr, token: &str, query: &str, variables: Value) -> Value {
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/graphql"))
        .bearer_auth(token)
        .json(&json!({ "query": query, "variables": variables }))
        .send()
        .await
        .expect("post");
    response.json().await.unwrap_or(Value::Null)
}

fn error_code(body: &Value) -> Option<String> {
    body["errors"][0]["extensions"]["code"].as_str().map(str::to_string)
}

async fn count_events(app: &App, event_type: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM event_log WHERE event_type = $1")
        .bind(event_type)
        .fetch_one(app.env.pool())
        .await
        .expect("count")
}

/// Every row of every table of the database, as text, that contains `needle`.
async fn rows_containing(app: &App, needle: &str) -> Vec<String> {
    let tables: Vec<String> = sqlx::query_scalar("SELECT tablename::text FROM pg_tables WHERE schemaname = 'public'")
        .fetch_all(app.env.pool())
        .await
        .expect("tables");
    let mut found = Vec::new();
    for table in tables {
        let rows: Vec<String> = sqlx::query_scalar(&format!("SELECT t::text FROM {table} t WHERE t::text LIKE '%' || $1 || '%'"))
            .bind(needle)
            .fetch_all(app.env.pool())
            .await
            .expect("scan");
        found.extend(rows.into_iter().map(|row| format!("{table}: {row}")));
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_in_with_github_creates_the_user_once_and_signing_out_ends_the_session() {
    let app = start().await;
    app.github.add_person("Alice", 501, Some("Alice Liddell"));
    let mut browser = Browser::new(app.addr);
    let host = browser.host();

    // Signed out, the session says how to sign in.
    let session: Value = serde_json::from_str(&browser.get(&app.url("/auth/session")).await.body).expect("json");
    assert_eq!(session["signedIn"], false);

    let landed = browser.sign_in("alice", "/dashboard/acme/web").await;
    assert_eq!(landed.url, app.url("/dashboard/acme/web"), "back where the sign-in started");
    let session_cookie = browser.set_cookies.iter().find(|c| c.starts_with("understudy_session=")).expect("session cookie").clone();
    for flag in ["HttpOnly", "Secure", "SameSite=Lax", "Path=/"] {
        assert!(session_cookie.contains(flag), "session cookie {session_cookie} lacks {flag}");
    }
    let csrf_cookie = browser.set_cookies.iter().find(|c| c.starts_with("understudy_csrf=")).expect("csrf cookie").clone();
    assert!(!csrf_cookie.contains("HttpOnly"), "the page reads the CSRF cookie");
    let session: Value = serde_json::from_str(&browser.get(&app.url("/auth/session")).await.body).expect("json");
    assert_eq!(session["user"]["login"], "Alice");
    assert_eq!(session["csrfToken"], browser.csrf());
    let (_, viewer) = browser.graphql("{ viewer { operator user { login name } } }", json!({}), true).await;
    assert_eq!(viewer["data"]["viewer"]["user"]["name"], "Alice Liddell", "{viewer}");

    // Signing in again opens a second session for the same user.
    let mut second = Browser::new(app.addr);
    second.sign_in("alice", "/").await;
    assert_eq!(count_events(&app, "UserSignedUp").await, 1);
    assert_eq!(count_events(&app, "SessionStarted").await, 2);

    // Her GitHub token is in the log only sealed.
    assert!(rows_containing(&app, "gho_").await.is_empty(), "a GitHub token in the clear");

    // Signing out needs the CSRF token, ends the session at once, and leaves the other one.
    let signout = app.url("/auth/signout");
    assert_eq!(browser.request(reqwest::Method::POST, &signout, &[], None).await.status, 403);
    let old_session = browser.cookie(&host, "understudy_session").expect("cookie");
    let out = browser.request(reqwest::Method::POST, &signout, &[("x-csrf-token", browser.csrf())], None).await;
    assert_eq!(out.status, 303);
    assert!(browser.cookie(&host, "understudy_session").is_none(), "the cookie is cleared");
    let replayed = reqwest::Client::new()
        .get(app.url("/auth/session"))
        .header("cookie", format!("understudy_session={old_session}"))
        .send()
        .await
        .expect("get");
    let replayed: Value = replayed.json().await.expect("json");
    assert_eq!(replayed["signedIn"], false, "an ended session's cookie is nobody");
    assert_eq!(count_events(&app, "SessionEnded").await, 1);
    let (_, still) = second.graphql("{ viewer { user { login } } }", json!({}), true).await;
    assert_eq!(still["data"]["viewer"]["user"]["login"], "Alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_refuses_forged_state_foreign_redirects_and_bad_tokens() {
    let app = start().await;
    app.github.add_person("bob", 502, None);

    // return_to may only lead back to us.
    for evil in ["https://evil.example/phish", "//evil.example/x", "/\\evil.example", "javascript:alert(1)"] {
        let mut browser = Browser::new(app.addr);
        let page = browser.sign_in("bob", evil).await;
        assert_eq!(page.url, app.url("/dashboard"), "return_to {evil:?}");
    }

    // A callback this browser did not start, or with another state, signs nobody in.
    let mut browser = Browser::new(app.addr);
    let page = browser.get(&app.url("/auth/github/callback?code=x&state=y")).await;
    assert_eq!(page.status, 400);
    let started = browser.get(&app.url("/auth/github/login?login=bob")).await;
    let authorize = started.location.expect("to GitHub");
    assert!(authorize.starts_with(&format!("{}/login/oauth/authorize?client_id={OAUTH_CLIENT_ID}", app.github.base_url())), "{authorize}");
    let back = browser.get(&authorize).await.location.expect("back from GitHub");
    let forged = back.split("&state=").next().expect("code part").to_string() + "&state=forged";
    assert_eq!(browser.get(&forged).await.status, 400);
    assert!(browser.cookie(&browser.host(), "understudy_session").is_none());
    // A code used once does not sign in twice.
    let mut replay = Browser::new(app.addr);
    let started = replay.get(&app.url("/auth/github/login?login=bob")).await;
    let back = replay.get(&started.location.expect("to GitHub")).await.location.expect("back");
    assert_eq!(replay.get(&back).await.status, 303, "the first use signs in");
    assert_eq!(replay.get(&back).await.status, 400, "the sign-in's cookie is spent");

    // A session cookie signed by someone else, or expired, is nobody.
    let claims =
        |exp: i64| json!({ "iss": "x", "aud": "understudy-session", "sub": Uuid::new_v4(), "sid": Uuid::new_v4(), "iat": 0, "exp": exp });
    let forged_signer = PreviewSigner::generate("evil");
    let user = understudy_adapters::github::user_id(502).0;
    let sid: Uuid = sqlx::query_scalar("SELECT session_id FROM user_sessions WHERE user_id = $1 LIMIT 1")
        .bind(user)
        .fetch_one(app.env.pool())
        .await
        .expect("a session");
    let real = |exp: i64| json!({ "iss": "x", "aud": "understudy-session", "sub": user, "sid": sid, "iat": 0, "exp": exp });
    let far = chrono::Utc::now().timestamp() + 3600;
    for (cookie, signed_in) in [
        (app.signer.sign(&real(far)), true),
        (forged_signer.sign(&real(far)), false),
        (app.signer.sign(&real(chrono::Utc::now().timestamp() - 10)), false),
        (app.signer.sign(&claims(far)), false),
        ("not-a-jwt".to_string(), false),
    ] {
        let response = reqwest::Client::new()
            .get(app.url("/auth/session"))
            .header("cookie", format!("understudy_session={cookie}"))
            .send()
            .await
            .expect("get");
        let body: Value = response.json().await.expect("json");
        assert_eq!(body["signedIn"], signed_in, "{cookie}");
    }

    // An unknown API token is refused outright, not treated as nobody.
    let body = bearer(app.addr, "us_0000", "{ viewer { operator } }", json!({})).await;
    assert_eq!(error_code(&body).as_deref(), Some("FORBIDDEN"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphql_changes_need_the_session_csrf_token_and_api_tokens_stand_alone() {
    let app = start().await;
    app.github.add_person("carol", 503, None);
    let mut browser = Browser::new(app.addr);
    browser.sign_in("carol", "/").await;

    let create = "mutation($n: String!) { createApiToken(name: $n) { token apiToken { id name } } }";
    let (status, body) = browser.graphql(create, json!({ "n": "ci" }), false).await;
    assert_eq!((status, error_code(&body).as_deref()), (403, Some("CSRF")), "{body}");
    let (status, body) = browser.graphql(create, json!({ "n": "ci" }), true).await;
    assert_eq!(status, 200, "{body}");
    let token = body["data"]["createApiToken"]["token"].as_str().expect("token").to_string();
    let id = body["data"]["createApiToken"]["apiToken"]["id"].as_str().expect("id").to_string();
    assert!(token.starts_with("us_"));
    assert!(rows_containing(&app, &token).await.is_empty(), "the token itself is kept nowhere");

    // The token works without cookie or CSRF token, lists itself without its secret, and is
    // refused once revoked.
    let listed = bearer(app.addr, &token, "{ viewer { user { login } apiTokens { id name } } }", json!({})).await;
    assert_eq!(listed["data"]["viewer"]["user"]["login"], "carol", "{listed}");
    assert_eq!(listed["data"]["viewer"]["apiTokens"], json!([{ "id": id, "name": "ci" }]));
    let revoked = bearer(app.addr, &token, "mutation($id: UUID!) { revokeApiToken(id: $id) }", json!({ "id": id })).await;
    assert_eq!(revoked["data"]["revokeApiToken"], true, "{revoked}");
    let after = bearer(app.addr, &token, "{ viewer { user { login } } }", json!({})).await;
    assert_eq!(error_code(&after).as_deref(), Some("FORBIDDEN"), "{after}");

    // Nobody signed in gets nothing, with a code that says so.
    let anonymous =
        reqwest::Client::new().post(app.url("/graphql")).json(&json!({ "query": "{ environments { id } }" })).send().await.expect("post");
    let anonymous: Value = anonymous.json().await.expect("json");
    assert_eq!(error_code(&anonymous).as_deref(), Some("UNAUTHENTICATED"), "{anonymous}");
}

/// The matrix as the product promises it, written out here rather than read from the code under
/// test. Rows: Owner, Admin, Member, Billing. Columns: Manage Projects, Manage Users, Manage
/// Billing, Manage Settings, View Projects, View Users, View Billing, View Settings, View Preview
/// Environments.
const EXPECTED: [[bool; 9]; 4] = [
    [true, true, true, true, true, true, true, true, true],
    [true, true, false, true, true, true, true, true, true],
    [false, false, false, false, true, true, true, true, true],
    [false, false, true, false, true, true, true, true, true],
];

fn index(permission: Permission) -> usize {
    Permission::ALL.iter().position(|p| *p == permission).expect("permission")
}

/// The operation that exercises each permission, through GraphQL.
fn operation(permission: Permission, account: AccountId, project: ProjectId, n: usize) -> (String, Value) {
    let (a, p) = (account.to_string(), project.to_string());
    match permission {
        Permission::ManageProjects => ("mutation($p: UUID!) { updateProject(projectId: $p, productionBranch: \"main\") { id } }".into(), json!({ "p": p })),
        Permission::ManageUsers => (
            "mutation($a: UUID!, $l: String!) { inviteMember(accountId: $a, login: $l, role: \"Member\") { login } }".into(),
            json!({ "a": a, "l": format!("newcomer-{n}") }),
        ),
        Permission::ManageBilling => (
            "mutation($a: UUID!) { setBilling(accountId: $a, holder: \"Acme\", cardNumber: \"4242 4242 4242 4242\", email: \"pay@acme.test\") { card } }".into(),
            json!({ "a": a }),
        ),
        Permission::ManageSettings => (
            "mutation($p: UUID!, $n: String!) { setSecret(projectId: $p, name: $n, value: \"v\") { name } }".into(),
            json!({ "p": p, "n": format!("KEY_{n}") }),
        ),
        Permission::ViewProjects => ("query($a: UUID!) { account(id: $a) { projects { id } } }".into(), json!({ "a": a })),
        Permission::ViewUsers => ("query($a: UUID!) { account(id: $a) { members { role } } }".into(), json!({ "a": a })),
        Permission::ViewBilling => ("query($a: UUID!) { account(id: $a) { billing { card } } }".into(), json!({ "a": a })),
        Permission::ViewSettings => ("query($p: UUID!) { project(id: $p) { secrets { name } } }".into(), json!({ "p": p })),
        Permission::ViewPreviewEnvironments => ("query($p: UUID) { environments(projectId: $p) { id } }".into(), json!({ "p": p })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cell_of_the_role_matrix_holds_through_the_api() {
    let app = start().await;
    let people = [("olivia", 601u64, Role::Owner), ("adam", 602, Role::Admin), ("mia", 603, Role::Member), ("bill", 604, Role::Billing)];
    // The members can read the repository on GitHub (previews need that); the outsider cannot.
    for (login, id, _) in people {
        app.github.add_person(login, id, None);
        app.github.grant(login, REPO);
    }
    app.github.add_person("oscar", 605, None);
    let (account, project) = app.team_with_project(601).await;

    // Everyone signs in and gets an API token; the Owner invites the others, who accept.
    let mut tokens = HashMap::new();
    for (login, _, _) in people.iter().copied().chain([("oscar", 605, Role::Member)]) {
        let mut browser = Browser::new(app.addr);
        browser.sign_in(login, "/").await;
        let (_, body) = browser.graphql("mutation { createApiToken(name: \"matrix\") { token } }", json!({}), true).await;
        tokens.insert(login, body["data"]["createApiToken"]["token"].as_str().expect("token").to_string());
    }
    let invite = "mutation($a: UUID!, $l: String!, $r: String!) { inviteMember(accountId: $a, login: $l, role: $r) { login role } }";
    for (login, _, role) in &people[1..] {
        let body = bearer(app.addr, &tokens["olivia"], invite, json!({ "a": account.to_string(), "l": login, "r": role.as_str() })).await;
        assert!(body["errors"].is_null(), "{body}");
        let pending = bearer(app.addr, &tokens[login], "{ viewer { invitations { accountId role } } }", json!({})).await;
        assert_eq!(pending["data"]["viewer"]["invitations"][0]["role"], role.as_str(), "{pending}");
        let accepted = bearer(
            app.addr,
            &tokens[login],
            "mutation($a: UUID!) { acceptInvitation(accountId: $a) { role } }",
            json!({ "a": account.to_string() }),
        )
        .await;
        assert_eq!(accepted["data"]["acceptInvitation"]["role"], role.as_str(), "{accepted}");
    }
    let members = bearer(
        app.addr,
        &tokens["mia"],
        "query($a: UUID!) { account(id: $a) { members { login role } } }",
        json!({ "a": account.to_string() }),
    )
    .await;
    assert_eq!(members["data"]["account"]["members"].as_array().map(Vec::len), Some(4), "{members}");

    // Every role × every permission, and an outsider who cannot read the repository either.
    let mut n = 0;
    for (login, _, role) in people.iter().copied().map(|(l, i, r)| (l, i, Some(r))).chain([("oscar", 605, None)]) {
        for permission in Permission::ALL {
            n += 1;
            let (query, variables) = operation(permission, account, project, n);
            let body = bearer(app.addr, &tokens[login], &query, variables).await;
            let allowed = role.is_some_and(|r| EXPECTED[Role::ALL.iter().position(|x| *x == r).expect("role")][index(permission)]);
            assert_eq!(body["errors"].is_null(), allowed, "{login} ({role:?}) {permission:?}: {body}");
            if !allowed {
                let code = error_code(&body).unwrap_or_default();
                assert!(["FORBIDDEN", "NOT_FOUND"].contains(&code.as_str()), "{login} {permission:?}: {body}");
            }
        }
    }

    // A member who cannot read the repository on GitHub sees the project's settings, not its
    // previews.
    let target = Target::Branch { branch: BranchName::parse("main").expect("branch") };
    let sha = CommitSha::parse("c".repeat(40)).expect("sha");
    app.env.runtime.store.deploy_commit(project, &target, &Entrypoint::parse("main.w").expect("e"), &sha, &meta()).await.expect("deploy");
    eventually(Duration::from_secs(20), "Mia to see the production environment", || async {
        let body = bearer(app.addr, &tokens["mia"], "{ environments { id } }", json!({})).await;
        (body["data"]["environments"].as_array().map(Vec::len) == Some(1)).then_some(())
    })
    .await;
    app.github.revoke("mia", REPO);
    let (query, variables) = operation(Permission::ViewPreviewEnvironments, account, project, 0);
    let previews = eventually(Duration::from_secs(10), "the revoked access to be noticed", || async {
        let body = bearer(app.addr, &tokens["mia"], &query, variables.clone()).await;
        (error_code(&body).as_deref() == Some("NOT_FOUND")).then_some(body)
    })
    .await;
    assert!(previews["data"].is_null(), "{previews}");
    let (query, variables) = operation(Permission::ViewSettings, account, project, 0);
    let settings = bearer(app.addr, &tokens["mia"], &query, variables).await;
    assert!(settings["errors"].is_null(), "{settings}");
    let everything = bearer(app.addr, &tokens["mia"], "{ environments { id } }", json!({})).await;
    assert!(everything["errors"].is_null(), "{everything}");
    let listed_project = everything["data"]["environments"].as_array().map(Vec::len);
    assert_eq!(listed_project, Some(0), "unfiltered lists leave out what she cannot see: {everything}");
    app.github.grant("mia", REPO);

    // Billing shows the card mangled to everyone, and the number is nowhere.
    let billing = bearer(
        app.addr,
        &tokens["mia"],
        "query($a: UUID!) { account(id: $a) { billing { card holder } } }",
        json!({ "a": account.to_string() }),
    )
    .await;
    assert_eq!(billing["data"]["account"]["billing"]["card"], "•••• •••• •••• 4242", "{billing}");
    assert!(rows_containing(&app, "4242424242424242").await.is_empty());
    assert!(rows_containing(&app, "4242 4242 4242 4242").await.is_empty());

    // A team always keeps an Owner; only an Owner makes Owners or deletes the team.
    let olivia = understudy_adapters::github::user_id(601).to_string();
    let mia = understudy_adapters::github::user_id(603).to_string();
    let change = "mutation($a: UUID!, $u: UUID!, $r: String!) { changeRole(accountId: $a, userId: $u, role: $r) { role } }";
    let last = bearer(app.addr, &tokens["olivia"], change, json!({ "a": account.to_string(), "u": olivia, "r": "Admin" })).await;
    assert_eq!(error_code(&last).as_deref(), Some("LAST_OWNER"), "{last}");
    let leave = bearer(
        app.addr,
        &tokens["olivia"],
        "mutation($a: UUID!, $u: UUID!) { removeMember(accountId: $a, userId: $u) }",
        json!({ "a": account.to_string(), "u": olivia }),
    )
    .await;
    assert_eq!(error_code(&leave).as_deref(), Some("LAST_OWNER"), "{leave}");
    let promote = bearer(app.addr, &tokens["adam"], change, json!({ "a": account.to_string(), "u": mia, "r": "Owner" })).await;
    assert_eq!(error_code(&promote).as_deref(), Some("FORBIDDEN"), "{promote}");
    let delete = "mutation($a: UUID!) { deleteTeam(accountId: $a) }";
    let by_admin = bearer(app.addr, &tokens["adam"], delete, json!({ "a": account.to_string() })).await;
    assert!(by_admin["errors"].is_array(), "{by_admin}");
    let promoted = bearer(app.addr, &tokens["olivia"], change, json!({ "a": account.to_string(), "u": mia, "r": "Owner" })).await;
    assert_eq!(promoted["data"]["changeRole"]["role"], "Owner", "{promoted}");
    let demoted = bearer(app.addr, &tokens["olivia"], change, json!({ "a": account.to_string(), "u": olivia, "r": "Member" })).await;
    assert_eq!(demoted["data"]["changeRole"]["role"], "Member", "with another Owner, the first may step down: {demoted}");
    let by_owner = bearer(app.addr, &tokens["mia"], delete, json!({ "a": account.to_string() })).await;
    assert_eq!(by_owner["data"]["deleteTeam"], true, "{by_owner}");
    let gone = bearer(app.addr, &tokens["mia"], "query($a: UUID!) { account(id: $a) { name } }", json!({ "a": account.to_string() })).await;
    assert_eq!(error_code(&gone).as_deref(), Some("NOT_FOUND"), "{gone}");
    // Every step is in the team's history.
    let history: Vec<String> = sqlx::query_scalar("SELECT event_type FROM event_log WHERE aggregate_id = $1 ORDER BY aggregate_version")
        .bind(account.0)
        .fetch_all(app.env.pool())
        .await
        .expect("history");
    for event in ["MemberInvited", "InvitationAccepted", "MemberAdded", "BillingDetailsSet", "MemberRoleChanged", "AccountDeleted"] {
        assert!(history.iter().any(|e| e == event), "{event} missing from {history:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previews_admit_only_signed_in_people_who_can_read_the_repository() {
    let app = start().await;
    app.github.add_person("dana", 701, None);
    app.github.add_person("eve", 702, None);
    app.github.grant("dana", REPO);
    let (_, project) = app.team_with_project(700).await;
    let target = Target::Branch { branch: BranchName::parse("feature").expect("branch") };
    let entrypoint = Entrypoint::parse("main.w").expect("entrypoint");
    let sha = CommitSha::parse("a".repeat(40)).expect("sha");
    app.env.runtime.store.deploy_commit(project, &target, &entrypoint, &sha, &meta()).await.expect("deploy");
    let environment = understudy_domain::ids::EnvironmentId::derive(project, &target, &entrypoint);
    eventually(Duration::from_secs(20), "the environment in the read model", || async {
        let found: Option<Uuid> = sqlx::query_scalar("SELECT environment_id FROM environments WHERE environment_id = $1")
            .bind(environment.0)
            .fetch_optional(app.env.pool())
            .await
            .ok()?;
        found
    })
    .await;
    let preview = format!("http://{}.{DOMAIN}/some/page?x=1", environment.0.simple());

    // A tool without a session gets 401; a browser is sent to sign in.
    let api = reqwest::Client::new()
        .get(format!("http://{}/some/page", app.addr))
        .header("host", format!("{}.{DOMAIN}", environment.0.simple()))
        .send()
        .await
        .expect("get");
    assert_eq!(api.status(), 401);
    let mut stranger = Browser::new(app.addr);
    let first = stranger.get(&preview).await;
    let step = first.location.expect("redirected");
    assert!(step.starts_with(&app.url("/auth/preview?")), "{step}");
    let login = stranger.get(&step).await.location.expect("to sign in");
    assert!(login.starts_with(&app.url("/auth/github/login?return_to=")), "{login}");
    let github = stranger.get(&login).await.location.expect("to GitHub");
    assert!(github.starts_with(&format!("{}/login/oauth/authorize?", app.github.base_url())), "{github}");

    // Dana can read the repository: signing in from the preview link lands her on the page she
    // asked for (the preview is still being built, so the proxy says so).
    let mut dana = Browser::new(app.addr);
    let page = dana.sign_in("dana", step.strip_prefix(&app.url("")).expect("our path")).await;
    assert_eq!(page.url, preview, "back on the page asked for");
    assert_eq!(page.status, 503, "{}", page.body);
    assert!(page.body.contains("on its way"), "{}", page.body);
    let preview_host = format!("{}.{DOMAIN}", environment.0.simple());
    assert!(dana.cookie(&preview_host, "understudy_preview").is_some());
    assert!(dana.cookie(&preview_host, "understudy_session").is_none(), "the session cookie stays with the API's host");

    // Eve signs in but cannot read the repository: refused, and the API agrees.
    let mut eve = Browser::new(app.addr);
    eve.sign_in("eve", "/").await;
    let page = eve.visit(&preview).await;
    assert_eq!(page.status, 403, "{}", page.body);
    assert!(eve.cookie(&preview_host, "understudy_preview").is_none());
    let (_, body) = eve.graphql("query($p: UUID) { environments(projectId: $p) { id } }", json!({ "p": project.to_string() }), true).await;
    assert_eq!(error_code(&body).as_deref(), Some("NOT_FOUND"), "{body}");
    let logs = reqwest::Client::new()
        .get(app.url(&format!("/environments/{}/logs/build", environment.0)))
        .header("cookie", format!("understudy_session={}", eve.cookie(&eve.host(), "understudy_session").expect("cookie")))
        .send()
        .await
        .expect("logs");
    assert_eq!(logs.status(), 404);

    // Dana loses access on GitHub: once the cached answer expires, so does her access here.
    app.github.revoke("dana", REPO);
    let refused = eventually(Duration::from_secs(10), "the revoked access to be noticed", || async {
        let page = dana.fork().get(&preview).await;
        (page.status == 403).then_some(page)
    })
    .await;
    assert!(refused.body.contains("no longer have access"), "{}", refused.body);

    // A hand-off token for one preview opens no other.
    let other = understudy_domain::ids::EnvironmentId(Uuid::new_v4());
    let token = app.signer.sign(&json!({
        "aud": "understudy-preview-handoff", "sub": understudy_adapters::github::user_id(701), "sid": Uuid::new_v4(),
        "env": environment.0, "path": "/", "exp": chrono::Utc::now().timestamp() + 60
    }));
    let mut thief = Browser::new(app.addr);
    let page = thief.get(&format!("http://{}.{DOMAIN}/.understudy/auth?token={token}", other.0.simple())).await;
    assert!(page.status == 403 || page.status == 404, "{} {}", page.status, page.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_the_key_seals_every_secret_and_session_again_and_no_value_is_ever_in_the_clear() {
    let app = start().await;
    app.github.add_person("frank", 801, None);
    let (_, project) = app.team_with_project(801).await;
    let mut browser = Browser::new(app.addr);
    browser.sign_in("frank", "/").await;
    let canary = format!("canary-{}", Uuid::new_v4().simple());
    let set = "mutation($p: UUID!, $v: String!) { setSecret(projectId: $p, name: \"API_TOKEN\", value: $v, scope: \"preview\") { name scope updatedAt } }";
    let (_, body) = browser.graphql(set, json!({ "p": project.to_string(), "v": canary }), true).await;
    assert_eq!(body["data"]["setSecret"]["scope"], "preview", "{body}");
    assert!(!body.to_string().contains(&canary), "the value is never returned");
    let (_, listed) =
        browser.graphql("query($p: UUID!) { project(id: $p) { secrets { name scope } } }", json!({ "p": project.to_string() }), true).await;
    assert_eq!(listed["data"]["project"]["secrets"], json!([{ "name": "API_TOKEN", "scope": "preview" }]), "{listed}");
    assert!(rows_containing(&app, &canary).await.is_empty(), "the plain value is in the database");

    let add =
        "mutation($p: UUID!) { addNotificationTarget(projectId: $p, url: \"https://chat.example.com/hook\") { secret target { id } } }";
    let (_, added) = browser.graphql(add, json!({ "p": project.to_string() }), true).await;
    let signing = added["data"]["addNotificationTarget"]["secret"].as_str().unwrap_or_else(|| panic!("{added}")).to_string();
    let target: Uuid = added["data"]["addNotificationTarget"]["target"]["id"].as_str().expect("id").parse().expect("uuid");

    let old = SecretKey::from_bytes(&[9u8; 32]).expect("the app's key");
    let new = SecretKey::from_bytes(&[10u8; 32]).expect("key").with_previous([old.clone()]);
    let store = &app.env.runtime.store;
    let done = understudy_api::cli::reseal_all(store, &new).await.expect("rotate");
    assert_eq!(done, understudy_api::cli::Resealed { secrets: 1, sessions: 1, notifications: 1 });
    let bare = SecretKey::from_bytes(&[10u8; 32]).expect("key");
    let state = store.projects.load(project.0).await.expect("load").into_inner();
    let secret = &state.secrets["API_TOKEN"];
    assert_eq!(secret.sealed.key_id, new.id());
    assert_eq!(bare.open(project, "API_TOKEN", &secret.sealed).expect("the new key alone opens it"), canary);
    let resealed = &state.notifications[&target].secret;
    assert_eq!(resealed.key_id, new.id());
    let opened = bare.open(project, &understudy_adapters::notify::secret_name(target), resealed).expect("the new key alone opens it");
    assert_eq!(opened, signing, "the notification target keeps its signing secret");
    let key_ids: Vec<String> =
        sqlx::query_scalar("SELECT github_token->>'key_id' FROM user_sessions").fetch_all(app.env.pool()).await.expect("ids");
    assert_eq!(key_ids, vec![new.id().to_string()]);
    for event in ["SecretResealed", "SessionTokenResealed", "NotificationSecretResealed"] {
        assert_eq!(count_events(&app, event).await, 1, "{event}");
    }
    // Rotating again finds nothing left to do.
    assert_eq!(understudy_api::cli::reseal_all(store, &new).await.expect("again"), understudy_api::cli::Resealed::default());
    assert!(rows_containing(&app, &canary).await.is_empty());
    assert!(rows_containing(&app, "gho_").await.is_empty());
    assert!(rows_containing(&app, &signing).await.is_empty(), "a notification's signing secret is never in the clear");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_know_who_subscribes_and_refuse_foreign_pages() {
    let app = start().await;
    app.github.add_person("gina", 901, None);
    app.github.add_person("hank", 902, None);
    app.github.grant("gina", REPO);
    let (_, project) = app.team_with_project(900).await;
    let mut gina = Browser::new(app.addr);
    gina.sign_in("gina", "/").await;
    let mut hank = Browser::new(app.addr);
    hank.sign_in("hank", "/").await;
    let session = |b: &Browser| format!("understudy_session={}", b.cookie(&b.host(), "understudy_session").expect("cookie"));
    let ours = format!("http://{}", app.addr);

    // A signed-in page of another site may not open a socket with the user's cookie.
    let foreign =
        understudy_tests::graphql_ws::connect_with(app.addr, &[("cookie", &session(&gina)), ("origin", "https://evil.example")]).await;
    assert_eq!(foreign.err(), Some(403));

    // From our own page, Gina follows her project's environments and sees a change.
    // `after: 0` replays what changed before the subscription began: nothing is missed.
    let subscription = "subscription($p: UUID) { environmentUpdated(projectId: $p, after: 0) { id status } }";
    let mut ws =
        understudy_tests::graphql_ws::connect_with(app.addr, &[("cookie", &session(&gina)), ("origin", &ours)]).await.expect("connect");
    understudy_tests::graphql_ws::subscribe(&mut ws, "1", subscription, json!({ "p": project.to_string() })).await;
    let target = Target::Branch { branch: BranchName::parse("live").expect("branch") };
    let sha = CommitSha::parse("b".repeat(40)).expect("sha");
    app.env.runtime.store.deploy_commit(project, &target, &Entrypoint::parse("main.w").expect("e"), &sha, &meta()).await.expect("deploy");
    let next = tokio::time::timeout(Duration::from_secs(20), understudy_tests::graphql_ws::next_json(&mut ws)).await.expect("an update");
    assert_eq!(next["payload"]["data"]["environmentUpdated"]["status"], "REQUESTED", "{next}");

    // Hank cannot read the repository: his subscription is refused with a reason, not left silent.
    let mut ws =
        understudy_tests::graphql_ws::connect_with(app.addr, &[("cookie", &session(&hank)), ("origin", &ours)]).await.expect("connect");
    understudy_tests::graphql_ws::subscribe(&mut ws, "1", subscription, json!({ "p": project.to_string() })).await;
    let refused = tokio::time::timeout(Duration::from_secs(10), understudy_tests::graphql_ws::next_json(&mut ws)).await.expect("an answer");
    assert_eq!(refused["payload"]["errors"][0]["extensions"]["code"], "NOT_FOUND", "{refused}");
    assert!(refused["payload"]["data"].is_null(), "{refused}");

    // Nobody at all is told to sign in.
    let mut ws = understudy_tests::graphql_ws::connect(app.addr).await;
    understudy_tests::graphql_ws::subscribe(&mut ws, "1", subscription, json!({ "p": project.to_string() })).await;
    let anonymous =
        tokio::time::timeout(Duration::from_secs(10), understudy_tests::graphql_ws::next_json(&mut ws)).await.expect("an answer");
    assert_eq!(anonymous["payload"]["errors"][0]["extensions"]["code"], "UNAUTHENTICATED", "{anonymous}");

    // Live subscriptions without `after` share one execution per node. Joining Gina's is still
    // checked per subscriber: Hank and nobody are refused as before, and start nothing.
    let live = "subscription($p: UUID) { environmentUpdated(projectId: $p) { id status } }";
    let mut shared =
        understudy_tests::graphql_ws::connect_with(app.addr, &[("cookie", &session(&gina)), ("origin", &ours)]).await.expect("connect");
    understudy_tests::graphql_ws::subscribe(&mut shared, "1", live, json!({ "p": project.to_string() })).await;
    eventually(Duration::from_secs(10), "Gina's live subscription to run", || async {
        (understudy_tests::metric(app.addr, "understudy_shared_subscription_executions").await == 1).then_some(())
    })
    .await;
    for (who, headers, code) in
        [("hank", vec![("cookie", session(&hank)), ("origin", ours.clone())], "NOT_FOUND"), ("nobody", vec![], "UNAUTHENTICATED")]
    {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut ws = understudy_tests::graphql_ws::connect_with(app.addr, &headers).await.expect("connect");
        understudy_tests::graphql_ws::subscribe(&mut ws, "1", live, json!({ "p": project.to_string() })).await;
        let answer =
            tokio::time::timeout(Duration::from_secs(10), understudy_tests::graphql_ws::next_json(&mut ws)).await.expect("an answer");
        assert_eq!(answer["payload"]["errors"][0]["extensions"]["code"], code, "{who}: {answer}");
        assert!(answer["payload"]["data"].is_null(), "{who}: {answer}");
    }
    assert_eq!(understudy_tests::metric(app.addr, "understudy_shared_subscription_executions").await, 1);
    // Gina's shared subscription hears the next change.
    let sha = CommitSha::parse("c".repeat(40)).expect("sha");
    app.env.runtime.store.deploy_commit(project, &target, &Entrypoint::parse("main.w").expect("e"), &sha, &meta()).await.expect("deploy");
    let next =
        tokio::time::timeout(Duration::from_secs(20), understudy_tests::graphql_ws::next_json(&mut shared)).await.expect("an update");
    assert_eq!(next["payload"]["data"]["environmentUpdated"]["status"], "REQUESTED", "{next}");
}

/// Every row of the access index, in a stable order.
async fn access_index(app: &App) -> Vec<String> {
    let mut rows = Vec::new();
    for table in understudy_adapters::access_index::TABLES {
        let mut found: Vec<String> =
            sqlx::query_scalar(&format!("SELECT t::text FROM {table} t")).fetch_all(app.env.pool()).await.expect("rows");
        found.sort();
        rows.extend(found.into_iter().map(|row| format!("{table}: {row}")));
    }
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_index_rebuilds_from_the_log_to_the_same_state() {
    let app = start().await;
    app.github.add_person("ivy", 951, None);
    app.github.add_person("jon", 952, None);
    let (account, _) = app.team_with_project(951).await;
    let mut ivy = Browser::new(app.addr);
    ivy.sign_in("ivy", "/").await;
    let mut jon = Browser::new(app.addr);
    jon.sign_in("jon", "/").await;
    let invite = "mutation($a: UUID!) { inviteMember(accountId: $a, login: \"jon\", role: \"Admin\") { login } }";
    ivy.graphql(invite, json!({ "a": account.to_string() }), true).await;
    jon.graphql("mutation($a: UUID!) { acceptInvitation(accountId: $a) { role } }", json!({ "a": account.to_string() }), true).await;
    let invite_more = "mutation($a: UUID!) { inviteMember(accountId: $a, login: \"kim\", role: \"Billing\") { login } }";
    jon.graphql(invite_more, json!({ "a": account.to_string() }), true).await;
    jon.graphql("mutation { createApiToken(name: \"laptop\") { token } }", json!({}), true).await;
    jon.request(reqwest::Method::POST, &app.url("/auth/signout"), &[("x-csrf-token", jon.csrf())], None).await;
    let live = access_index(&app).await;
    assert!(live.iter().any(|r| r.starts_with("account_invitations:") && r.contains("kim")), "{live:#?}");
    assert!(live.iter().any(|r| r.starts_with("api_tokens:")), "{live:#?}");

    assert_eq!(understudy_adapters::access_index::verify(app.env.pool()).await.expect("verify"), vec![], "live equals a rebuild");
    // A row changed behind the log's back is found, and the live index is left as it was.
    sqlx::query("UPDATE account_members SET role = 'Owner' WHERE role = 'Admin'").execute(app.env.pool()).await.expect("tamper");
    let differences = understudy_adapters::access_index::verify(app.env.pool()).await.expect("verify");
    assert_eq!(differences.len(), 1, "{differences:?}");
    assert_eq!((differences[0].table, differences[0].only_live.len(), differences[0].only_replayed.len()), ("account_members", 1, 1));
    assert!(differences[0].only_live[0].contains("Owner") && differences[0].only_replayed[0].contains("Admin"), "{differences:?}");
    let rebuilt = understudy_adapters::access_index::rebuild(app.env.pool()).await.expect("rebuild");
    assert!(rebuilt > 0);
    assert_eq!(access_index(&app).await, live, "a rebuild from the log equals the live index");

    // A database whose log predates the index gets it built when it is migrated.
    for table in understudy_adapters::access_index::TABLES {
        sqlx::query(&format!("DELETE FROM {table}")).execute(app.env.pool()).await.expect("empty");
    }
    understudy_adapters::db::migrate(app.env.pool()).await.expect("migrate");
    assert_eq!(access_index(&app).await, live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_maintainer_lists_their_repositories_and_makes_one_a_project() {
    let app = start().await;
    app.github.add_person("lena", 1301, None);
    // Three repositories she can reach (the last declared is the most recently updated), one
    // she cannot.
    for (name, id) in [("lena/alpha", 1401), ("lena/beta", 1402), ("lena/gamma", 1403)] {
        app.github.set_repo(name, id, "main", &["main.w"]);
        app.github.grant_admin("lena", name);
    }
    app.github.set_repo("lena-fans/mirror", 1405, "main", &[]);
    app.github.grant("lena", "lena-fans/mirror");
    app.github.set_repo("other/secret", 1404, "main", &[]);
    let mut browser = Browser::new(app.addr);
    browser.sign_in("lena", "/").await;
    let list = "query($after: String) { repositories(first: 2, after: $after) { edges { node { fullName canManage projectId defaultBranch } } pageInfo { hasNextPage endCursor } } }";
    let (_, first) = browser.graphql(list, json!({}), true).await;
    let names = |page: &Value| {
        page["data"]["repositories"]["edges"]
            .as_array()
            .expect("edges")
            .iter()
            .map(|e| e["node"]["fullName"].as_str().expect("name").to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&first), ["lena-fans/mirror", "lena/gamma"], "{first}");
    assert_eq!(first["data"]["repositories"]["pageInfo"]["hasNextPage"], true);
    let cursor = first["data"]["repositories"]["pageInfo"]["endCursor"].as_str().expect("cursor").to_string();
    let (_, second) = browser.graphql(list, json!({ "after": cursor }), true).await;
    assert_eq!(names(&second), ["lena/beta", "lena/alpha"], "{second}");
    assert_eq!(first["data"]["repositories"]["edges"][0]["node"]["canManage"], false, "she only reads the mirror");
    assert_eq!(second["data"]["repositories"]["pageInfo"]["hasNextPage"], false);

    // Clear errors for what cannot become a project.
    let create = "mutation($r: String!, $b: String) { createProject(repository: $r, productionBranch: $b) { id summary { name repository productionBranch } } }";
    for (repository, branch, code) in [
        ("other/secret", None, "NOT_FOUND"),
        ("lena/alpha", Some("no-such-branch"), "BAD_USER_INPUT"),
        ("not a repository", None, "BAD_USER_INPUT"),
    ] {
        let (_, body) = browser.graphql(create, json!({ "r": repository, "b": branch }), true).await;
        assert_eq!(error_code(&body).as_deref(), Some(code), "{repository}: {body}");
    }
    let (_, created) = browser.graphql(create, json!({ "r": "lena/alpha" }), true).await;
    assert_eq!(created["data"]["createProject"]["summary"]["productionBranch"], "main", "{created}");
    let project = created["data"]["createProject"]["id"].as_str().expect("id").to_string();
    let (_, again) = browser.graphql(create, json!({ "r": "lena/alpha" }), true).await;
    assert_eq!(error_code(&again).as_deref(), Some("ALREADY_EXISTS"), "{again}");
    let (_, listed) = browser.graphql(list, json!({ "after": cursor }), true).await;
    assert_eq!(listed["data"]["repositories"]["edges"][1]["node"]["projectId"], project.as_str());
    let (_, reader) = browser.graphql(create, json!({ "r": "lena-fans/mirror" }), true).await;
    assert_eq!(error_code(&reader).as_deref(), Some("FORBIDDEN"), "reading is not maintaining: {reader}");

    // She owns it (her personal account), so she manages it: entrypoints, then deletion.
    let (_, rule) = browser
        .graphql(
            "mutation($p: UUID!) { setEntrypoints(projectId: $p, entrypoints: [\"api.main.w\"]) { id } }",
            json!({ "p": project }),
            true,
        )
        .await;
    assert!(rule["errors"].is_null(), "{rule}");
    let (_, deleted) = browser.graphql("mutation($p: UUID!) { deleteProject(projectId: $p) }", json!({ "p": project }), true).await;
    assert_eq!(deleted["data"]["deleteProject"], true, "{deleted}");
    let active: bool = sqlx::query_scalar("SELECT active FROM projects WHERE project_id = $1::uuid")
        .bind(&project)
        .fetch_one(app.env.pool())
        .await
        .expect("row");
    assert!(!active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_can_open_its_previews_to_anyone_with_the_link() {
    let app = start().await;
    app.github.add_person("owen", 1501, None);
    app.github.add_person("rita", 1502, None);
    let (_, project) = app.team_with_project(1501).await;
    let target = Target::Branch { branch: BranchName::parse("demo").expect("branch") };
    let entrypoint = Entrypoint::parse("main.w").expect("entrypoint");
    app.env
        .runtime
        .store
        .deploy_commit(project, &target, &entrypoint, &CommitSha::parse("d".repeat(40)).expect("sha"), &meta())
        .await
        .expect("deploy");
    let environment = understudy_domain::ids::EnvironmentId::derive(project, &target, &entrypoint);
    let host = format!("{}.{DOMAIN}", environment.0.simple());
    let anonymous = || async {
        reqwest::Client::new()
            .get(format!("http://{}/", app.addr))
            .header("host", host.clone())
            .send()
            .await
            .expect("get")
            .status()
            .as_u16()
    };
    eventually(Duration::from_secs(20), "the environment in the read model", || async { (anonymous().await == 401).then_some(()) }).await;

    // Owen owns the project (the team's Owner): he opens its previews; Rita, who cannot read the
    // repository, may then open them too, and so may anyone without signing in.
    let mut owen = Browser::new(app.addr);
    owen.sign_in("owen", "/").await;
    let open = "mutation($p: UUID!, $v: Boolean) { updateProject(projectId: $p, publicPreviews: $v) { summary { publicPreviews } } }";
    let (_, body) = owen.graphql(open, json!({ "p": project.to_string(), "v": true }), true).await;
    assert_eq!(body["data"]["updateProject"]["summary"]["publicPreviews"], true, "{body}");
    assert_eq!(anonymous().await, 503, "open to anyone: the preview is still being built, and says so");
    let mut rita = Browser::new(app.addr);
    rita.sign_in("rita", "/").await;
    let (_, listed) =
        rita.graphql("query($p: UUID) { environments(projectId: $p) { id } }", json!({ "p": project.to_string() }), true).await;
    assert_eq!(listed["data"]["environments"][0]["id"], environment.to_string(), "{listed}");
    let (_, settings) =
        rita.graphql("query($p: UUID!) { project(id: $p) { secrets { name } } }", json!({ "p": project.to_string() }), true).await;
    assert_eq!(error_code(&settings).as_deref(), Some("NOT_FOUND"), "public previews do not open the settings: {settings}");

    // Closed again: back to who can read the repository.
    let (_, body) = owen.graphql(open, json!({ "p": project.to_string(), "v": false }), true).await;
    assert_eq!(body["data"]["updateProject"]["summary"]["publicPreviews"], false, "{body}");
    assert_eq!(anonymous().await, 401);
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM event_log WHERE aggregate_id = $1 AND event_type = 'VisibilityChanged'")
        .bind(project.0)
        .fetch_one(app.env.pool())
        .await
        .expect("count");
    assert_eq!(events, 2);
}
