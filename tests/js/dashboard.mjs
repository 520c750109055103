// Drives the dashboard in headless Chromium (Debian's, through playwright-core), as a person would:
// signs in through the fake GitHub, opens a project, watches a deployment go from queued to
// building to ready live, reads the logs, and sees the "new version ready" notice.
//
// Driven by tests/it/dashboard.rs: `node dashboard.mjs BASE_URL SCREENSHOT_DIR CONTEXT_JSON`.
// At each `STEP name` line it prints, it waits for one line on stdin: the Rust side has made
// that change in Understudy by then. Any failed expectation exits non-zero with the reason.

import { chromium } from "playwright-core";
import readline from "node:readline";
import path from "node:path";

const [base, shots, contextJson] = process.argv.slice(2);
const context = JSON.parse(contextJson);
const input = readline.createInterface({ input: process.stdin });
const lines = input[Symbol.asyncIterator]();
// Generous: the machine is shared, and the first Chromium start on it builds its caches.
const TIMEOUT = 30000;

async function step(name) {
  console.log(`STEP ${name}`);
  const { done } = await lines.next();
  if (done) throw new Error(`the test stopped answering at step ${name}`);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
const errors = [];
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 860 } });
  page.setDefaultTimeout(TIMEOUT);
  page.on("pageerror", (error) => errors.push(`page error: ${error.message}`));
  page.on("console", (message) => { if (message.type() === "error") errors.push(`console: ${message.text()}`); });
  const noMissingValues = async (what) => {
    const shown = await page.locator("main").innerText();
    if (/null|undefined|NaN/.test(shown)) throw new Error(`${what} shows a missing value:\n${shown}`);
  };
  const shot = (name) => page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true });

  // Signed out, the dashboard offers sign-in with GitHub, and comes back signed in.
  await page.goto(`${base}/dashboard`);
  await page.getByRole("link", { name: "Sign in with GitHub" }).waitFor();
  await shot("sign-in");
  await page.getByRole("link", { name: "Sign in with GitHub" }).click();
  await page.getByRole("heading", { name: "Your projects" }).waitFor();
  await page.getByText(context.login, { exact: true }).waitFor();
  await page.getByRole("link", { name: context.project, exact: true }).waitFor();
  await shot("overview");

  // The project page lists its environments; a push appears live.
  await page.getByRole("link", { name: context.project, exact: true }).click();
  await page.getByRole("heading", { name: context.project }).waitFor();
  await page.locator("tr", { hasText: "main" }).locator('[data-status="READY"]').waitFor();
  await step("push");
  const row = page.locator("tr", { hasText: context.branch });
  await row.locator('[data-status="REQUESTED"]').waitFor();
  await shot("project");

  // The environment page follows the build live: status, progress and log lines.
  await row.getByRole("link", { name: context.branch }).click();
  await page.getByRole("heading", { name: context.branch }).waitFor();
  await step("build");
  await page.locator('[data-status="BUILDING"]').waitFor();
  await page.locator("pre.log", { hasText: "compiling main.w" }).waitFor();
  await shot("environment-building");
  await step("ready");
  await page.locator('[data-status="READY"]').waitFor();
  await page.getByRole("link", { name: "Visit preview" }).waitFor();
  await page.getByRole("link", { name: "renders the greeting" }).waitFor();
  await page.locator("pre.log", { hasText: "listening" }).waitFor();
  await noMissingValues("the environment page");

  // A newer commit becomes ready while the page is open: it offers a refresh, keeps what it shows.
  const notice = page.getByText("A new version is ready");
  if (await notice.isVisible()) throw new Error("the refresh notice shows before there is a newer version");
  await step("newer");
  await notice.waitFor();
  await page.getByText(`at ${context.first.slice(0, 7)}`).waitFor();
  await shot("environment-refresh-notice");
  await page.getByRole("button", { name: "Refresh" }).click();
  await page.getByText(`at ${context.newer.slice(0, 7)}`).waitFor();

  // The logs have pages of their own, and can be downloaded.
  await page.getByRole("link", { name: "Full page" }).click();
  await page.getByRole("heading", { name: "Build log" }).waitFor();
  await page.locator("pre.log", { hasText: "second build" }).waitFor();
  const download = await page.getByRole("link", { name: "Download" }).getAttribute("href");
  const text = await (await page.request.get(`${base}${download}`)).text();
  if (!text.includes("second build")) throw new Error(`the downloaded log lacks its lines: ${text}`);
  await shot("build-log");
  await page.goBack();
  await page.getByRole("link", { name: "renders the greeting" }).click();
  await page.locator("pre.log", { hasText: "greeting ok" }).waitFor();

  // Settings: a secret is set through the form and listed by name only.
  await page.goto(`${base}/dashboard/${encodeURIComponent(context.account)}/${encodeURIComponent(context.project)}/-/settings`);
  await page.getByRole("heading", { name: `${context.project} settings` }).waitFor();
  await page.getByLabel("Name").fill("API_TOKEN");
  await page.getByLabel("Value").fill(context.secret);
  await page.getByRole("button", { name: "Set secret" }).click();
  await page.getByRole("cell", { name: "API_TOKEN", exact: true }).waitFor();
  if ((await page.content()).includes(context.secret)) throw new Error("the secret's value is on the page");
  await page.getByLabel(/Paths, comma separated/).fill("main.w, api.main.w");
  await page.getByRole("form", { name: "Entrypoints" }).getByRole("button", { name: "Save" }).click();
  await page.getByText("Entrypoints: main.w, api.main.w").waitFor();
  await shot("settings");

  // Tiers: production is promoted from staging by hand, from the project page, then frozen.
  await page.goto(`${base}/dashboard/${encodeURIComponent(context.account)}/${encodeURIComponent(context.project)}`);
  await page.getByRole("heading", { name: "Tiers" }).waitFor();
  await page.getByLabel("Usage, last 30 days").getByText(/\d+ deployments \(\d+ ready, \d+ failed\)/).waitFor();
  await page.locator('tr[data-tier="production"]', { hasText: "promotion from staging, by hand" }).waitFor();
  await page.getByRole("button", { name: "Promote to production" }).click();
  await page.locator("tr", { hasText: "production" }).locator('[data-status="REQUESTED"]').waitFor();
  page.once("dialog", (dialog) => dialog.accept("release week"));
  await page.getByRole("button", { name: "Freeze production" }).click();
  await page.locator('tr[data-tier="production"]', { hasText: "Frozen by ada: release week" }).waitFor();
  if (await page.getByRole("button", { name: "Promote to production" }).count()) throw new Error("a frozen tier offers promotion");
  await shot("tiers");

  // The team's page: members with their roles (an Owner may change them), and billing.
  await page.goto(`${base}/dashboard/${encodeURIComponent(context.account)}`);
  await page.getByRole("heading", { name: context.account, exact: true }).waitFor();
  const role = page.getByLabel(`Role of ${context.login}`);
  if ((await role.inputValue()) !== "Owner") throw new Error("the Owner is not shown as Owner");
  await page.getByText("No billing details.").waitFor();
  await noMissingValues("the account page");
  await shot("account");

  // The new-project flow lists the repositories GitHub lets this person reach.
  await page.getByRole("link", { name: "New project" }).click();
  await page.getByRole("heading", { name: "acme/web" }).waitFor();
  await page.getByRole("link", { name: "Open project" }).waitFor();
  await shot("new-project");

  if (errors.length) throw new Error(errors.join("\n"));
  console.log("DONE");
} catch (error) {
  console.error(String(error && error.stack || error));
  if (errors.length) console.error(errors.join("\n"));
  process.exitCode = 1;
} finally {
  await browser.close();
  input.close(); // stdin would keep node alive
  process.exit(process.exitCode ?? 0);
}
