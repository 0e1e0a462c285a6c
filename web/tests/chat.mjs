#!/usr/bin/env node
// End-to-end test of the browser chat in headless Chromium (playwright-core
// driving the system's Chromium; no browser download).
//
//   node tests/chat.mjs --url 'http://127.0.0.1:8080/?budget=25&max_tokens=24&seed=0' \
//        --prompt 'The city where Staime Ribrom was born is' --screenshot /tmp/chat.png [--reload]
//
// Options:
//   --url URL          the page, query included (required)
//   --prompt TEXT      the prompt (default: the URL's ?prompt=)
//   --screenshot PATH  full-page PNG taken at the end (also on failure)
//   --timeout-ms N     limit for the whole run (default 600000)
//   --chromium PATH    the browser (default $CHROMIUM or /usr/bin/chromium)
//   --reload           after the first answer, reload and ask again: the second
//                      run shows the pages coming from the browser's Cache API
//   --no-webgpu        launch without --enable-unsafe-webgpu (checks the notice)
//   --type-pause-ms N  wait N ms between typing the prompt and sending it, as a
//                      person would (a hierarchical memory prefetches the typed
//                      question's blocks meanwhile); default 0
//   --quota-bytes N    give the page's origin a storage quota of N bytes before
//                      it loads (CDP Storage.overrideQuotaForOrigin), e.g. far
//                      less than the pages streamed: the local copy is trimmed
//
// Prints one JSON line on stdout:
//   {"adapter", "device", "model", "text", "result", "stats", "loadSeconds",
//    "status", "storageNotice", "persist", "reload": {...} | null}
// Everything else (browser console, page errors, progress) goes to stderr.
// Exit status: 0 answered, 1 error / no WebGPU / timeout, 2 bad arguments.

import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';
import { chromiumArgs } from './chromium.mjs';

const USAGE = 'usage: node tests/chat.mjs --url URL [--prompt TEXT] [--screenshot PATH] ' +
  '[--timeout-ms N] [--chromium PATH] [--reload] [--no-webgpu] [--type-pause-ms N] [--quota-bytes N]';

/** Command-line options, validated. */
function options() {
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        url: { type: 'string' },
        prompt: { type: 'string' },
        screenshot: { type: 'string' },
        'timeout-ms': { type: 'string', default: '600000' },
        chromium: { type: 'string', default: process.env.CHROMIUM || '/usr/bin/chromium' },
        reload: { type: 'boolean', default: false },
        'no-webgpu': { type: 'boolean', default: false },
        'type-pause-ms': { type: 'string', default: '0' },
        'quota-bytes': { type: 'string' },
      },
    }));
  } catch (err) {
    usage(err.message);
  }
  if (!values.url) usage('--url is required');
  if (!URL.canParse(values.url)) usage(`--url ${JSON.stringify(values.url)} is not a URL`);
  const prompt = values.prompt ?? new URL(values.url).searchParams.get('prompt');
  if (!prompt) usage('--prompt is required (or give ?prompt= in the URL)');
  const timeoutMs = Number(values['timeout-ms']);
  if (!(timeoutMs > 0)) usage('--timeout-ms must be a positive number');
  const typePauseMs = Number(values['type-pause-ms']);
  if (!(typePauseMs >= 0)) usage('--type-pause-ms must be a number ≥ 0');
  const quotaBytes = values['quota-bytes'] === undefined ? null : Number(values['quota-bytes']);
  if (quotaBytes !== null && !(Number.isInteger(quotaBytes) && quotaBytes >= 0)) {
    usage('--quota-bytes must be a whole number ≥ 0');
  }
  return { ...values, prompt, timeoutMs, typePauseMs, quotaBytes };
}

function usage(message) {
  console.error(`chat.mjs: ${message}\n${USAGE}`);
  process.exit(2);
}

const log = (msg) => console.error(`[chat.mjs] ${msg}`);

/** A failure that ends the run with exit status 1. */
class Failure extends Error {}

/** Reads #status and the test hooks the page exposes (see app.js). */
function pageState() {
  const status = document.querySelector('#status');
  return {
    state: status?.dataset.state ?? null,
    status: status?.textContent ?? '',
    turns: Number(document.body.dataset.turns || 0),
    error: window.memlayerError ?? null,
    nogpu: document.querySelector('#nogpu')?.hidden === false
      ? document.querySelector('#nogpu').innerText.replace(/\s+/g, ' ').trim() : null,
  };
}

/** Throws a Failure if the page reports an error or no WebGPU. */
function checkPage(s) {
  if (s.state === 'nogpu') throw new Failure(`no WebGPU: ${s.status}`);
  if (s.error) throw new Failure(`page error: ${s.error}`);
  if (s.state === 'error') throw new Failure(`page error: ${s.status}`);
}

/** One run: (re)load the page, wait for the model, ask `prompt`, wait for the answer. */
async function run(page, opts, deadline, { reload }) {
  const left = () => Math.max(1, deadline - Date.now());
  const started = Date.now();
  if (reload) await page.reload({ waitUntil: 'load', timeout: left() });
  else await page.goto(opts.url, { waitUntil: 'load', timeout: left() });

  // Loaded (or autorun already generating), failed, or no WebGPU.
  log(`${reload ? 'reload' : 'load'}: waiting for the model`);
  await page.waitForFunction(
    () => ['ready', 'generating', 'error', 'nogpu'].includes(document.querySelector('#status')?.dataset.state),
    null, { timeout: left(), polling: 200 });
  let s = await page.evaluate(pageState);
  checkPage(s);
  const loadSeconds = await page.evaluate(() => window.memlayerLoadSeconds ?? null)
    ?? (Date.now() - started) / 1000;
  log(`ready after ${loadSeconds.toFixed(2)} s: ${s.status}`);

  if (s.state === 'ready' && s.turns === 0) {
    await page.fill('#prompt', opts.prompt);
    if (opts.typePauseMs > 0) await page.waitForTimeout(opts.typePauseMs);
    await page.click('#send');
  }
  log(`generating for ${JSON.stringify(opts.prompt)}`);
  await page.waitForFunction(
    () => Number(document.body.dataset.turns || 0) >= 1 || window.memlayerError ||
      document.querySelector('#status')?.dataset.state === 'nogpu',
    null, { timeout: left(), polling: 200 });
  s = await page.evaluate(pageState);
  if (s.turns < 1) checkPage(s);

  const out = await page.evaluate(() => ({
    adapter: window.memlayerDevice?.adapter ?? null,
    device: document.querySelector('#device')?.textContent.trim() ?? null,
    model: window.memlayerModel ?? null,
    text: window.memlayerTurns[0].text,
    result: window.memlayerTurns[0].result,
    stats: window.memlayerTurns[0].stats,
    status: document.querySelector('#status')?.textContent ?? '',
    storageNotice: window.memlayerStorageNotice ?? null,
    persist: window.memlayerPersist ?? null,
  }));
  log(`answer: ${JSON.stringify(out.text)} (${out.result.tokens} tokens, ` +
    `${Number(out.result.tokensPerSecond).toFixed(1)} tok/s)`);
  return { ...out, loadSeconds };
}

async function main() {
  const opts = options();
  const deadline = Date.now() + opts.timeoutMs;
  log(`launching ${opts.chromium}`);
  const browser = await chromium.launch({
    executablePath: opts.chromium,
    headless: true,
    args: chromiumArgs(!opts['no-webgpu']),
    timeout: Math.min(opts.timeoutMs, 120000),
  });
  let code = 0;
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 860 } });
    page.setDefaultTimeout(opts.timeoutMs);
    // Console messages (the worker's included), page errors, failed requests.
    page.on('console', (m) => console.error(`[browser] ${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => console.error(`[browser] page error: ${e.message}`));
    page.on('requestfailed', (r) => console.error(`[browser] request failed: ${r.url()} ${r.failure()?.errorText ?? ''}`));
    if (opts.quotaBytes !== null) {
      // a small per-origin quota (kept across the reload: same browser context)
      const origin = new URL(opts.url).origin;
      const cdp = await page.context().newCDPSession(page);
      await cdp.send('Storage.overrideQuotaForOrigin', { origin, quotaSize: opts.quotaBytes });
      log(`storage quota of ${origin}: ${opts.quotaBytes} bytes`);
    }

    try {
      const first = await run(page, opts, deadline, { reload: false });
      const second = opts.reload ? await run(page, opts, deadline, { reload: true }) : null;
      process.stdout.write(JSON.stringify({ ...first, reload: second }) + '\n');
    } catch (err) {
      code = 1;
      const s = await page.evaluate(pageState).catch(() => null);
      if (s?.nogpu) log(`no-WebGPU notice: ${s.nogpu}`);
      console.error(`chat.mjs: ${err instanceof Failure ? err.message : err.stack || err}`);
    } finally {
      if (opts.screenshot) {
        await page.screenshot({ path: opts.screenshot, fullPage: true })
          .then(() => log(`screenshot: ${opts.screenshot}`))
          .catch((e) => log(`screenshot failed: ${e.message}`));
      }
    }
  } finally {
    await browser.close();
  }
  process.exit(code);
}

main().catch((err) => {
  console.error(`chat.mjs: ${err.stack || err}`);
  process.exit(1);
});
