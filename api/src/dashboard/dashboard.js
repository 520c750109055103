// Understudy's dashboard: one small ES module, no framework, no build step. Pages are drawn from
// the GraphQL API; live parts follow GraphQL subscriptions over `graphql-transport-ws` (no
// polling). Every piece of data reaches the page through textContent, never as HTML.

const main = document.getElementById("main");
const who = document.getElementById("who");
let csrf = null;

// ---- DOM -----------------------------------------------------------------------------------------
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}
const enc = encodeURIComponent;
const when = (iso) => (iso ? new Date(iso).toISOString().replace("T", " ").slice(0, 16) + " UTC" : "");
function show(...nodes) {
  // Optional parts are passed as null: they are left out, never drawn as text.
  main.replaceChildren(...nodes.flat().filter((node) => node !== null && node !== undefined && node !== false));
  const heading = main.querySelector("h1");
  if (heading) document.title = heading.textContent + " · Understudy";
}
function failure(message) {
  return h("div", { class: "error", role: "alert" }, message);
}

// ---- GraphQL over HTTP and WebSocket ---------------------------------------------------------------
async function gql(query, variables = {}) {
  const headers = { "content-type": "application/json" };
  if (csrf) headers["x-csrf-token"] = csrf;
  const response = await fetch("/graphql", { method: "POST", headers, body: JSON.stringify({ query, variables }) });
  const body = await response.json().catch(() => ({ errors: [{ message: `HTTP ${response.status}` }] }));
  if (body.errors && body.errors.length) {
    const error = new Error(body.errors.map((e) => e.message).join("; "));
    error.code = body.errors[0].extensions && body.errors[0].extensions.code;
    throw error;
  }
  return body.data;
}

/** One WebSocket for the page, speaking graphql-transport-ws; reconnects with backoff. */
class Live {
  constructor() {
    this.next = 1;
    this.subs = new Map();
    this.wait = 500;
    this.connect();
  }
  connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    this.ws = new WebSocket(`${scheme}://${location.host}/graphql`, "graphql-transport-ws");
    this.ready = false;
    this.ws.onopen = () => this.ws.send(JSON.stringify({ type: "connection_init" }));
    this.ws.onmessage = (event) => {
      const message = JSON.parse(event.data);
      if (message.type === "connection_ack") {
        this.ready = true;
        this.wait = 500;
        for (const [id, sub] of this.subs) this.start(id, sub);
      } else if (message.type === "next") {
        const sub = this.subs.get(message.id);
        if (!sub) return;
        if (message.payload.errors) sub.onError(message.payload.errors.map((e) => e.message).join("; "));
        else sub.onData(message.payload.data);
      } else if (message.type === "error") {
        const sub = this.subs.get(message.id);
        if (sub) sub.onError(message.payload.map((e) => e.message).join("; "));
      } else if (message.type === "ping") {
        this.ws.send(JSON.stringify({ type: "pong" }));
      }
    };
    this.ws.onclose = () => {
      this.ready = false;
      setTimeout(() => this.connect(), this.wait);
      this.wait = Math.min(this.wait * 2, 10000);
    };
  }
  start(id, sub) {
    // Each (re)start resumes from where the subscription got to.
    this.ws.send(JSON.stringify({ id, type: "subscribe", payload: { query: sub.query, variables: sub.variables() } }));
  }
  subscribe(query, variables, onData, onError = (m) => console.warn(m)) {
    const id = String(this.next++);
    const sub = { query, variables, onData, onError };
    this.subs.set(id, sub);
    if (this.ready) this.start(id, sub);
    return () => {
      this.subs.delete(id);
      if (this.ready) this.ws.send(JSON.stringify({ id, type: "complete" }));
    };
  }
}
let live = null;
const liveFeed = () => (live ||= new Live());

// ---- Shared pieces -----------------------------------------------------------------------------------
const STATUS = {
  REQUESTED: ["Queued", "queued"],
  AWAITING_APPROVAL: ["Awaiting approval", "awaiting-approval"],
  BUILDING: ["Building", "building"],
  STARTING: ["Building", "building"],
  READY: ["Ready", "ready"],
  FAILED: ["Failed", "failed"],
  STALE: ["Stale", "stale"],
  TERMINATED: ["Terminated", "terminated"],
};
function statusBadge(status) {
  const [label, cls] = STATUS[status] || [status, ""];
  return h("span", { class: `status ${cls}`, dataset: { status } }, label);
}
const inFlight = (status) => ["REQUESTED", "BUILDING", "STARTING"].includes(status);
const ENVIRONMENT_FIELDS = `id projectId targetKind branch pullRequest entrypoint status latestDeploymentId latestCommit
  previewUrl failure testsPassed testsFailed tests { name outcome durationMs } updatedAt position`;

function envPath(account, project, env, rest = "") {
  const query = env.entrypoint === "main.w" ? "" : `?entrypoint=${enc(env.entrypoint)}`;
  return `/dashboard/${enc(account)}/${enc(project)}/${enc(env.branch)}${rest}${query}`;
}
function crumbs(...parts) {
  const items = [h("a", { href: "/dashboard" }, "Dashboard")];
  for (const [label, href] of parts) items.push(" / ", href ? h("a", { href }, label) : label);
  return h("nav", { class: "crumbs", "aria-label": "Breadcrumb" }, items);
}

// ---- Pages -------------------------------------------------------------------------------------------
async function overview() {
  const data = await gql(`{ viewer { operator user { login } memberships { role account { id name kind } }
    invitations { accountId accountName role } } }`);
  const viewer = data.viewer;
  const sections = [h("h1", {}, "Your projects")];
  for (const invitation of viewer.invitations) {
    const accept = async () => {
      await gql(`mutation($a: UUID!) { acceptInvitation(accountId: $a) { role } }`, { a: invitation.accountId });
      route();
    };
    sections.push(h("div", { class: "notice" }, `You are invited to ${invitation.accountName} as ${invitation.role}.`,
      h("button", { class: "primary", onclick: accept }, "Accept")));
  }
  if (!viewer.memberships.length) {
    sections.push(h("p", { class: "empty" }, "You are not a member of any account yet. Install the Understudy GitHub App on your account or organization, or ask a team Owner to invite you."));
  }
  for (const membership of viewer.memberships) {
    const account = membership.account;
    const detail = await gql(`query($a: UUID!) { account(id: $a) { projects { id name repository productionBranch active } } }`, { a: account.id });
    const projects = detail.account.projects;
    sections.push(h("h2", {}, h("a", { href: `/dashboard/${enc(account.name)}` }, account.name), " ",
      h("span", { class: "muted" }, `${account.kind} · ${membership.role}`)));
    sections.push(projects.length
      ? h("div", { class: "grid" }, projects.map((p) => h("article", { class: "card" },
          h("h3", {}, h("a", { href: `/dashboard/${enc(account.name)}/${enc(p.name)}` }, p.name)),
          h("div", { class: "muted" }, p.repository), h("div", { class: "muted" }, `production: ${p.productionBranch}`))))
      : h("p", { class: "empty" }, "No projects yet: add a repository to the GitHub App installation."));
  }
  show(...sections);
}

async function accountPage(accountName) {
  const data = await gql(`{ viewer { memberships { role account { id name } } } }`);
  const membership = data.viewer.memberships.find((m) => m.account.name.toLowerCase() === accountName.toLowerCase());
  if (!membership) return show(crumbs([accountName]), failure(`No account ${accountName} that you are a member of.`));
  const id = membership.account.id;
  const { account } = await gql(`query($a: UUID!) { account(id: $a) { id name kind members { userId login role }
    invitations { login role } billing { holder card email } projects { id name repository } } }`, { a: id });
  const manages = account.kind === "team" && ["Owner", "Admin"].includes(membership.role);
  const changeRole = (member) => async (event) => {
    try {
      await gql(`mutation($a: UUID!, $u: UUID!, $r: String!) { changeRole(accountId: $a, userId: $u, role: $r) { role } }`, { a: id, u: member.userId, r: event.target.value });
    } catch (error) { event.target.value = member.role; main.append(failure(error.message)); }
  };
  const removeMember = (member) => async () => {
    if (!window.confirm(`Remove ${member.login || member.userId} from ${account.name}?`)) return;
    try {
      await gql(`mutation($a: UUID!, $u: UUID!) { removeMember(accountId: $a, userId: $u) }`, { a: id, u: member.userId });
      route();
    } catch (error) { main.append(failure(error.message)); }
  };
  const invite = async (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    try {
      await gql(`mutation($a: UUID!, $l: String!, $r: String!) { inviteMember(accountId: $a, login: $l, role: $r) { login } }`,
        { a: id, l: form.get("login"), r: form.get("role") });
      route();
    } catch (error) { event.target.after(failure(error.message)); }
  };
  show(
    crumbs([account.name]),
    h("h1", {}, account.name),
    h("h2", {}, "Projects"),
    account.projects.length ? h("ul", {}, account.projects.map((p) => h("li", {}, h("a", { href: `/dashboard/${enc(account.name)}/${enc(p.name)}` }, p.name), " ", h("span", { class: "muted" }, p.repository))))
      : h("p", { class: "empty" }, "No projects yet."),
    h("h2", {}, "Members"),
    h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Login"), h("th", { scope: "col" }, "Role"), h("th", { scope: "col" }, ""))),
      h("tbody", {}, account.members.map((m) => h("tr", {}, h("td", {}, m.login || m.userId),
        h("td", {}, manages ? h("select", { "aria-label": `Role of ${m.login || m.userId}`, onchange: changeRole(m) },
          ["Owner", "Admin", "Member", "Billing"].map((r) => h("option", { selected: r === m.role }, r))) : m.role),
        h("td", {}, manages ? h("button", { onclick: removeMember(m) }, "Remove") : "")))))),
    account.invitations.length ? h("p", { class: "muted" }, "Invited: ", account.invitations.map((i) => `${i.login} (${i.role})`).join(", ")) : null,
    manages
      ? h("form", { class: "inline", onsubmit: invite, "aria-label": "Invite a member" },
          h("label", {}, "GitHub login", h("input", { name: "login", required: true, autocomplete: "off" })),
          h("label", {}, "Role", h("select", { name: "role" }, ["Member", "Admin", "Billing", "Owner"].map((r) => h("option", {}, r)))),
          h("button", { class: "primary", type: "submit" }, "Invite"))
      : null,
    h("h2", {}, "Billing"),
    account.billing ? h("p", {}, `${account.billing.holder} · ${account.billing.card} · ${account.billing.email}`) : h("p", { class: "empty" }, "No billing details."),
  );
}

async function findProject(accountName, projectName) {
  const { projectByName } = await gql(`query($a: String!, $n: String!) { projectByName(account: $a, name: $n) { id summary { name repository productionBranch publicPreviews } } }`,
    { a: accountName, n: projectName });
  return projectByName;
}

/** The project's tiers: where each one's commits come from, its freeze, and its actions. */
function tiersSection(projectId, tiers) {
  if (!tiers.length) return null;
  const status = h("div", { role: "status" });
  // After an action the page is drawn again from the API: the new state is what it shows.
  const act = (work) => async () => {
    try {
      if (await work()) route();
    } catch (error) { status.replaceChildren(failure(error.message)); }
  };
  const promote = (tier) => act(async () => {
    await gql(`mutation($p: UUID!, $t: String!) { promote(projectId: $p, tier: $t) { commit requested } }`, { p: projectId, t: tier.name });
    return true;
  });
  const freeze = (tier) => act(async () => {
    const reason = window.prompt(`Why freeze ${tier.name}? Nothing is deployed or promoted into it automatically until it is unfrozen.`);
    if (!reason) return false;
    await gql(`mutation($p: UUID!, $n: String!, $r: String!) { freezeTier(projectId: $p, name: $n, reason: $r) { name } }`, { p: projectId, n: tier.name, r: reason });
    return true;
  });
  const unfreeze = (tier) => act(async () => {
    await gql(`mutation($p: UUID!, $n: String!) { unfreezeTier(projectId: $p, name: $n) { name } }`, { p: projectId, n: tier.name });
    return true;
  });
  const source = (tier) => tier.branches ? `pushes to ${tier.branches}`
    : tier.tags ? `tags ${tier.tags}`
    : `promotion from ${tier.promotedFrom}${tier.automatic ? ", automatic" : ", by hand"}`;
  return [
    h("h2", {}, "Tiers"),
    h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, ["Tier", "Fed by", "State", ""].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, tiers.map((tier) => h("tr", { dataset: { tier: tier.name } },
        h("td", {}, tier.name),
        h("td", {}, source(tier), tier.smoke ? h("span", { class: "muted" }, " · smoke test") : null),
        h("td", {}, tier.frozen ? `Frozen by ${tier.frozen.by}: ${tier.frozen.reason}` : "—"),
        h("td", { class: "row-actions" },
          tier.promotedFrom && !tier.frozen ? h("button", { onclick: promote(tier), "aria-label": `Promote to ${tier.name}` }, "Promote") : null,
          tier.frozen
            ? h("button", { onclick: unfreeze(tier), "aria-label": `Unfreeze ${tier.name}` }, "Unfreeze")
            : h("button", { onclick: freeze(tier), "aria-label": `Freeze ${tier.name}` }, "Freeze"))))))),
    status,
  ];
}

/** The last 30 days of the project's previews, in one line (counts and durations only). */
async function usageLine(projectId) {
  const from = new Date(Date.now() - 29 * 86400000).toISOString().slice(0, 10);
  const { usage } = await gql(`query($p: UUID, $f: NaiveDate) { usage(projectId: $p, from: $f) { deploymentsRequested deploymentsReady deploymentsFailed meanSecondsToReady testsPassed testsFailed environmentsCreated } }`,
    { p: projectId, f: from });
  const sum = (key) => usage.reduce((total, day) => total + day[key], 0);
  const ready = sum("deploymentsReady");
  const seconds = usage.reduce((total, day) => total + (day.meanSecondsToReady || 0) * day.deploymentsReady, 0);
  return h("p", { class: "muted", "aria-label": "Usage, last 30 days" },
    `Last 30 days: ${sum("deploymentsRequested")} deployments (${ready} ready, ${sum("deploymentsFailed")} failed)`,
    ready ? ` · ${Math.round(seconds / ready)} s to ready on average` : "",
    ` · ${sum("testsPassed")} tests passed, ${sum("testsFailed")} failed · ${sum("environmentsCreated")} environments created`);
}

async function projectPage(accountName, projectName) {
  const project = await findProject(accountName, projectName);
  const { environments } = await gql(`query($p: UUID) { environments(projectId: $p, first: 500) { ${ENVIRONMENT_FIELDS} } }`, { p: project.id });
  const { project: settings } = await gql(`query($p: UUID!) { project(id: $p) { tiers { name branches tags promotedFrom automatic smoke frozen { by reason } } } }`, { p: project.id });
  const rows = new Map();
  const tbody = h("tbody");
  let position = 0;
  const row = (env) => h("tr", { dataset: { environment: env.id } },
    h("td", {}, h("a", { href: envPath(accountName, projectName, env) }, env.pullRequest ? `#${env.pullRequest} ${env.branch}` : env.branch)),
    h("td", {}, env.entrypoint),
    h("td", {}, statusBadge(env.status)),
    h("td", {}, env.previewUrl && env.status === "READY" ? h("a", { href: env.previewUrl }, "Visit") : ""),
    h("td", {}, env.testsPassed + env.testsFailed ? `${env.testsPassed} passed, ${env.testsFailed} failed` : "—"),
    h("td", {}, when(env.updatedAt)));
  const put = (env) => {
    position = Math.max(position, env.position);
    const fresh = row(env);
    const old = rows.get(env.id);
    if (old) old.replaceWith(fresh); else tbody.prepend(fresh);
    rows.set(env.id, fresh);
    empty.hidden = rows.size > 0;
  };
  const empty = h("p", { class: "empty" }, "No environments yet: open a pull request or push to the production branch.");
  for (const env of [...environments].reverse()) put(env);
  show(
    crumbs([accountName, `/dashboard/${enc(accountName)}`], [projectName]),
    h("h1", {}, projectName),
    h("p", { class: "muted" }, `${project.summary.repository} · production branch ${project.summary.productionBranch} · `,
      h("a", { href: `/dashboard/${enc(accountName)}/${enc(projectName)}/-/settings` }, "Settings")),
    await usageLine(project.id),
    tiersSection(project.id, settings.tiers),
    h("h2", {}, "Environments"),
    empty,
    h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, ["Branch", "Entrypoint", "Status", "Preview", "Tests", "Updated"].map((t) => h("th", { scope: "col" }, t)))),
      tbody)),
  );
  liveFeed().subscribe(`subscription($p: UUID, $after: Int) { environmentUpdated(projectId: $p, after: $after) { ${ENVIRONMENT_FIELDS} } }`,
    () => ({ p: project.id, after: position }), (data) => put(data.environmentUpdated));
}

async function settingsPage(accountName, projectName) {
  const found = await findProject(accountName, projectName);
  const { project } = await gql(`query($p: UUID!) { project(id: $p) { id secrets { name scope updatedAt } } }`, { p: found.id });
  const setSecret = async (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    try {
      await gql(`mutation($p: UUID!, $n: String!, $v: String!, $s: String!) { setSecret(projectId: $p, name: $n, value: $v, scope: $s) { name } }`,
        { p: found.id, n: form.get("name"), v: form.get("value"), s: form.get("scope") });
      route();
    } catch (error) { event.target.after(failure(error.message)); }
  };
  const branch = async (event) => {
    event.preventDefault();
    try {
      await gql(`mutation($p: UUID!, $b: String) { updateProject(projectId: $p, productionBranch: $b) { id } }`, { p: found.id, b: new FormData(event.target).get("branch") });
      route();
    } catch (error) { event.target.after(failure(error.message)); }
  };
  const entrypoints = async (event) => {
    event.preventDefault();
    const list = String(new FormData(event.target).get("entrypoints") || "").split(",").map((e) => e.trim()).filter(Boolean);
    try {
      await gql(`mutation($p: UUID!, $e: [String!]!) { setEntrypoints(projectId: $p, entrypoints: $e) { id } }`, { p: found.id, e: list });
      event.target.after(h("p", { class: "muted", role: "status" }, list.length ? `Entrypoints: ${list.join(", ")}` : "Entrypoints: detected from each commit"));
    } catch (error) { event.target.after(failure(error.message)); }
  };
  const visibility = async (event) => {
    try {
      await gql(`mutation($p: UUID!, $v: Boolean) { updateProject(projectId: $p, publicPreviews: $v) { id } }`, { p: found.id, v: event.target.checked });
    } catch (error) { event.target.closest("form").after(failure(error.message)); event.target.checked = !event.target.checked; }
  };
  const remove = (name) => async () => {
    if (!window.confirm(`Remove the secret ${name}? Deployments after this one will not get it.`)) return;
    await gql(`mutation($p: UUID!, $n: String!) { removeSecret(projectId: $p, name: $n) }`, { p: found.id, n: name });
    route();
  };
  show(
    crumbs([accountName, `/dashboard/${enc(accountName)}`], [projectName, `/dashboard/${enc(accountName)}/${enc(projectName)}`], ["Settings"]),
    h("h1", {}, `${projectName} settings`),
    h("h2", {}, "Production branch"),
    h("form", { class: "inline", onsubmit: branch },
      h("label", {}, "Branch", h("input", { name: "branch", value: found.summary.productionBranch, required: true })),
      h("button", { type: "submit" }, "Save")),
    h("h2", {}, "Entrypoints"),
    h("form", { class: "inline", onsubmit: entrypoints, "aria-label": "Entrypoints" },
      h("label", {}, "Paths, comma separated (empty: main.w and *.main.w, or the detected app)", h("input", { name: "entrypoints", placeholder: "main.w, api.main.w" })),
      h("button", { type: "submit" }, "Save")),
    h("h2", {}, "Who can open previews"),
    h("form", { class: "inline", onsubmit: (e) => e.preventDefault() },
      h("label", { class: "check" }, h("input", { type: "checkbox", name: "public", checked: found.summary.publicPreviews, onchange: visibility }),
        "Anyone with the link (otherwise: people who can read the repository on GitHub)")),
    h("h2", {}, "Secrets"),
    h("p", { class: "muted" }, "Values are sealed when set and never shown again; forks' pull requests never get them."),
    project.secrets.length
      ? h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, h("tr", {}, ["Name", "Scope", "Updated", ""].map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, project.secrets.map((s) => h("tr", {}, h("td", {}, s.name), h("td", {}, s.scope), h("td", {}, when(s.updatedAt)),
            h("td", {}, h("button", { onclick: remove(s.name), "aria-label": `Remove ${s.name}` }, "Remove")))))))
      : h("p", { class: "empty" }, "No secrets."),
    h("form", { class: "inline", onsubmit: setSecret, "aria-label": "Set a secret" },
      h("label", {}, "Name", h("input", { name: "name", required: true, pattern: "[A-Za-z_][A-Za-z0-9_]*", autocomplete: "off" })),
      h("label", {}, "Value", h("input", { name: "value", type: "password", required: true, autocomplete: "off" })),
      h("label", {}, "Scope", h("select", { name: "scope" }, ["all", "production", "preview"].map((s) => h("option", {}, s)))),
      h("button", { class: "primary", type: "submit" }, "Set secret")),
  );
}

/** The environment of `branch` (and `?entrypoint=`) of a project. */
async function findEnvironment(accountName, projectName, branch) {
  const project = await findProject(accountName, projectName);
  const wanted = new URLSearchParams(location.search).get("entrypoint");
  const { environments } = await gql(`query($p: UUID, $b: String) { environments(projectId: $p, branch: $b) { ${ENVIRONMENT_FIELDS} } }`, { p: project.id, b: branch });
  const env = environments.find((e) => (wanted ? e.entrypoint === wanted : e.entrypoint === "main.w")) || (!wanted && environments[0]);
  return { project, env };
}

/** Streams a deployment's log into `pre`, live; returns the stop function. */
function streamLog(pre, deploymentId, stream) {
  let last = "0";
  return liveFeed().subscribe(`subscription($d: UUID!, $s: String!, $f: String) { deploymentLogs(deploymentId: $d, stream: $s, from: $f) { nano line } }`,
    () => ({ d: deploymentId, s: stream, f: last }), (data) => {
      const line = data.deploymentLogs;
      last = line.nano;
      const stick = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.append(line.line + "\n");
      if (stick) pre.scrollTop = pre.scrollHeight;
    });
}

async function environmentPage(accountName, projectName, branch) {
  const { env } = await findEnvironment(accountName, projectName, branch);
  const base = [accountName, `/dashboard/${enc(accountName)}`];
  const projectCrumb = [projectName, `/dashboard/${enc(accountName)}/${enc(projectName)}`];
  if (!env) return show(crumbs(base, projectCrumb, [branch]), h("h1", {}, branch), h("p", { class: "empty" }, "No environment for this branch yet."));
  // The Ready deployment on screen: a newer one becoming Ready is offered as a refresh.
  let shownReady = env.status === "READY" ? env.latestDeploymentId : null;
  let following = env.latestDeploymentId;
  const status = h("span", { "aria-live": "polite" }, statusBadge(env.status));
  const progress = h("div", { class: "progress", hidden: !inFlight(env.status), "aria-hidden": "true" }, h("span"));
  const preview = h("p");
  const failureText = h("p", { class: "error", hidden: !env.failure, role: "alert" }, env.failure || "");
  const notice = h("div", { class: "notice", hidden: true, role: "status" }, "A new version is ready.", h("button", { class: "primary", onclick: () => location.reload() }, "Refresh"));
  const tests = h("div");
  const log = h("pre", { class: "log", tabindex: "0", "aria-label": "Build log" });
  const download = h("a", { href: `/deployments/${env.latestDeploymentId}/logs/build?download=1` }, "Download");
  const actions = h("div", { class: "actions" });
  const drawPreview = (e) => preview.replaceChildren(e.previewUrl && e.status === "READY" ? h("a", { class: "button primary", href: e.previewUrl }, "Visit preview") : h("span", { class: "muted" }, "The preview link appears when it is ready."));
  const drawTests = (e) => tests.replaceChildren(e.tests.length
    ? h("ul", { class: "tests" }, e.tests.map((t) => h("li", {}, h("span", { class: `status ${t.outcome === "Passed" ? "ready" : "failed"}` }, t.outcome), " ", h("a", { href: envPath(accountName, projectName, e, `/logs/tests/${enc(t.name)}`) }, t.name),
        t.durationMs != null ? h("span", { class: "muted" }, ` ${t.durationMs} ms`) : "")))
    : h("p", { class: "empty" }, "No test results yet."));
  const act = (label, mutation, extra = {}) => h("button", { onclick: async (event) => {
    event.target.disabled = true;
    try { await gql(mutation, { e: env.id, ...extra }); } catch (error) { actions.after(failure(error.message)); }
    event.target.disabled = false;
  } }, label);
  // A failed deployment can be debugged: a fresh instance behind a tunnel only its token opens.
  const debugBox = h("div", { class: "notice", hidden: true, role: "status" });
  const debugButton = () => h("button", { onclick: async (event) => {
    event.target.disabled = true;
    try {
      const { openDebugSession: d } = await gql(`mutation($e: UUID!) { openDebugSession(environmentId: $e) { browserUrl session { filesUrl logsUrl expiresAt } } }`, { e: env.id });
      debugBox.replaceChildren(`Debug session open until ${when(d.session.expiresAt)}: `,
        h("a", { href: d.browserUrl, target: "_blank", rel: "noopener" }, "Open the tunnel"), " · ",
        h("a", { href: d.session.filesUrl }, "Files"), " · ", h("a", { href: d.session.logsUrl }, "Log"));
      debugBox.hidden = false;
    } catch (error) { actions.after(failure(error.message)); }
    event.target.disabled = false;
  } }, "Debug");
  const drawActions = (e) => actions.replaceChildren(...[
    act("Redeploy", `mutation($e: UUID!) { redeploy(environmentId: $e) { status } }`),
    e.status === "FAILED" || e.testsFailed > 0 ? debugButton() : null,
    e.status === "READY" ? act("Restart", `mutation($e: UUID!) { restartEnvironment(environmentId: $e) { status } }`) : null,
    e.status === "READY" ? act("Run tests", `mutation($e: UUID!) { runTests(environmentId: $e) { status } }`) : null,
    ["READY", "FAILED"].includes(e.status) ? act("Stop", `mutation($e: UUID!) { stopEnvironment(environmentId: $e) { status } }`) : null,
    e.status === "STALE" ? act("Wake", `mutation($e: UUID!) { wakeEnvironment(environmentId: $e) { status } }`) : null,
    e.status === "AWAITING_APPROVAL" ? act("Approve", `mutation($d: UUID!) { approveDeployment(deploymentId: $d) { status } }`, { d: e.latestDeploymentId }) : null,
  ].filter(Boolean));
  drawPreview(env); drawTests(env); drawActions(env);
  let stopLog = streamLog(log, following, "build");
  let position = env.position;
  const title = env.pullRequest ? `#${env.pullRequest} ${env.branch}` : env.branch;
  show(
    crumbs(base, projectCrumb, [title]),
    h("h1", {}, `${title} `, h("span", { class: "muted" }, env.entrypoint)),
    notice,
    h("p", {}, "Status: ", status, " ", h("span", { class: "muted" }, env.latestCommit ? `at ${env.latestCommit.slice(0, 7)}` : "")),
    progress, failureText, preview, actions, debugBox,
    h("h2", {}, "Tests"), tests,
    h("h2", {}, "Build log ", h("small", {}, download, " · ", h("a", { href: envPath(accountName, projectName, env, "/logs/build/") }, "Full page"))),
    log,
  );
  liveFeed().subscribe(`subscription($p: UUID, $after: Int) { environmentUpdated(projectId: $p, after: $after) { ${ENVIRONMENT_FIELDS} } }`,
    () => ({ p: env.projectId, after: position }), (data) => {
      const e = data.environmentUpdated;
      if (e.id !== env.id || e.position <= position) return;
      position = e.position;
      if (shownReady && e.status === "READY" && e.latestDeploymentId !== shownReady) {
        notice.hidden = false; // a newer deployment is live: offer to refresh, keep what is shown
        return;
      }
      if (shownReady && e.latestDeploymentId !== shownReady) return;
      status.replaceChildren(statusBadge(e.status));
      progress.hidden = !inFlight(e.status);
      failureText.hidden = !e.failure;
      failureText.textContent = e.failure || "";
      drawPreview(e); drawTests(e); drawActions(e);
      if (e.status === "READY") shownReady = e.latestDeploymentId;
      if (e.latestDeploymentId !== following) {
        // A new build of what this page follows: its log replaces the old one.
        following = e.latestDeploymentId;
        stopLog();
        log.replaceChildren();
        download.href = `/deployments/${following}/logs/build?download=1`;
        stopLog = streamLog(log, following, "build");
      }
    });
}

async function logPage(accountName, projectName, branch, stream, label) {
  const { env } = await findEnvironment(accountName, projectName, branch);
  if (!env || !env.latestDeploymentId) return show(failure("No deployment here yet."));
  const log = h("pre", { class: "log full", tabindex: "0", "aria-label": label });
  const query = stream === "build" ? "build" : `tests/${enc(stream.slice("test:".length))}`;
  show(
    crumbs([accountName, `/dashboard/${enc(accountName)}`], [projectName, `/dashboard/${enc(accountName)}/${enc(projectName)}`],
      [branch, envPath(accountName, projectName, env)], [label]),
    h("h1", {}, label),
    h("p", {}, h("a", { href: `/deployments/${env.latestDeploymentId}/logs/${query}?download=1` }, "Download"), " ",
      h("span", { class: "muted" }, `deployment ${env.latestDeploymentId}`)),
    log,
  );
  streamLog(log, env.latestDeploymentId, stream);
}

async function tokensPage() {
  const data = await gql(`{ viewer { apiTokens { id name createdAt } } }`);
  const created = h("div");
  const create = async (event) => {
    event.preventDefault();
    const name = new FormData(event.target).get("name");
    const { createApiToken } = await gql(`mutation($n: String!) { createApiToken(name: $n) { token } }`, { n: name });
    created.replaceChildren(h("div", { class: "notice", role: "status" }, "Copy it now; it will not be shown again: ", h("code", {}, createApiToken.token)));
  };
  const revoke = (id) => async () => { await gql(`mutation($id: UUID!) { revokeApiToken(id: $id) }`, { id }); route(); };
  show(
    crumbs(["API tokens"]),
    h("h1", {}, "API tokens"),
    h("p", { class: "muted" }, "Send a token as Authorization: Bearer … to /graphql."),
    created,
    data.viewer.apiTokens.length
      ? h("ul", {}, data.viewer.apiTokens.map((t) => h("li", {}, `${t.name} `, h("span", { class: "muted" }, when(t.createdAt)), " ", h("button", { onclick: revoke(t.id) }, "Revoke"))))
      : h("p", { class: "empty" }, "No tokens."),
    h("form", { class: "inline", onsubmit: create, "aria-label": "Create a token" },
      h("label", {}, "Name", h("input", { name: "name", required: true })), h("button", { class: "primary", type: "submit" }, "Create token")),
  );
}

async function newProjectPage() {
  const list = h("ul", { class: "repositories" });
  const more = h("button", { hidden: true }, "More repositories");
  let after = null;
  const projects = new Map();
  for (const m of (await gql(`{ viewer { memberships { account { id name } } } }`)).viewer.memberships) {
    const { account } = await gql(`query($a: UUID!) { account(id: $a) { projects { id name } } }`, { a: m.account.id });
    for (const p of account.projects) projects.set(p.id, `/dashboard/${enc(m.account.name)}/${enc(p.name)}`);
  }
  const create = (repo) => async (event) => {
    event.preventDefault();
    const branch = new FormData(event.target).get("branch");
    try {
      await gql(`mutation($r: String!, $b: String) { createProject(repository: $r, productionBranch: $b) { id } }`, { r: repo.fullName, b: branch });
      const [owner, name] = repo.fullName.split("/");
      location.href = `/dashboard/${enc(owner)}/${enc(name)}`;
    } catch (error) { event.target.after(failure(error.message)); }
  };
  const page = async () => {
    const { repositories } = await gql(`query($after: String) { repositories(first: 30, after: $after) {
      edges { node { fullName private defaultBranch updatedAt canManage projectId } } pageInfo { hasNextPage endCursor } } }`, { after });
    for (const { node: repo } of repositories.edges) {
      let action;
      if (repo.projectId) action = projects.has(repo.projectId) ? h("a", { href: projects.get(repo.projectId) }, "Open project") : h("span", { class: "muted" }, "Already a project");
      else if (!repo.canManage) action = h("span", { class: "muted" }, "Needs admin or maintain on GitHub");
      else action = h("form", { class: "inline", onsubmit: create(repo), "aria-label": `Create a project from ${repo.fullName}` },
        h("label", {}, "Production branch", h("input", { name: "branch", value: repo.defaultBranch || "main", required: true })),
        h("button", { class: "primary", type: "submit" }, "Create project"));
      list.append(h("li", { class: "card" }, h("h3", {}, repo.fullName, repo.private ? h("span", { class: "muted" }, " (private)") : ""),
        h("div", { class: "muted" }, `updated ${when(repo.updatedAt)}`), action));
    }
    after = repositories.pageInfo.endCursor;
    more.hidden = !repositories.pageInfo.hasNextPage;
  };
  more.addEventListener("click", page);
  show(crumbs(["New project"]), h("h1", {}, "New project"),
    h("p", { class: "muted" }, "Your repositories on GitHub, most recently updated first. The Understudy GitHub App must be installed for the one you pick."),
    list, more);
  await page();
}

function signInPage() {
  const back = location.pathname + location.search;
  show(h("section", { class: "signin" }, h("h1", {}, "Sign in to Understudy"),
    h("p", { class: "muted" }, "Preview environments for every pull request. Sign in with the GitHub account that can read your repositories."),
    h("a", { class: "button primary", href: `/auth/github/login?return_to=${enc(back)}` }, "Sign in with GitHub")));
}

// ---- Routing -------------------------------------------------------------------------------------------
async function route() {
  const parts = location.pathname.split("/").filter(Boolean).map(decodeURIComponent);
  // parts[0] === "dashboard"
  const [, account, project, branch, ...rest] = parts;
  try {
    if (!account) return await overview();
    if (account === "-" && project === "tokens") return await tokensPage();
    if (account === "-" && project === "new") return await newProjectPage();
    if (!project) return await accountPage(account);
    if (!branch) return await projectPage(account, project);
    if (branch === "-" && rest[0] === "settings") return await settingsPage(account, project);
    if (rest[0] === "logs" && rest[1] === "build") return await logPage(account, project, branch, "build", "Build log");
    if (rest[0] === "logs" && rest[1] === "tests" && rest[2]) return await logPage(account, project, branch, `test:${rest[2]}`, `Test log: ${rest[2]}`);
    return await environmentPage(account, project, branch);
  } catch (error) {
    if (error.code === "UNAUTHENTICATED") return signInPage();
    show(failure(error.message));
  }
}

async function start() {
  const session = await (await fetch("/auth/session")).json();
  csrf = session.csrfToken || null;
  if (session.signedIn) {
    const signOut = h("form", { method: "post", action: "/auth/signout", onsubmit: async (event) => {
      event.preventDefault();
      await fetch("/auth/signout", { method: "POST", headers: { "x-csrf-token": csrf } });
      location.href = "/dashboard";
    } }, h("button", { type: "submit" }, "Sign out"));
    who.replaceChildren(h("a", { href: "/dashboard/-/new" }, "New project"), h("a", { href: "/dashboard/-/tokens" }, "API tokens"), h("span", {}, session.user.login), signOut);
  } else if (session.operator) {
    who.replaceChildren(h("span", { class: "muted" }, "Operator (no sign-in configured)"));
  } else {
    return signInPage();
  }
  await route();
}

start();
