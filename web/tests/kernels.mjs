#!/usr/bin/env node
// `memlayer bench`'s browser backends: runs the wasm bundle's kernelCheck
// (the product-key lookup and the embedding-bag forward on WebGPU) in headless
// Chromium (playwright-core driving the system's Chromium) and prints its
// answer.
//
//   node tests/kernels.mjs --url http://127.0.0.1:PORT/ --request FILE
//
// Options:
//   --url URL          where web/ is served (pkg/memlayer_web.js below it; required)
//   --request FILE     the JSON request (crates/memlayer-web/src/kernel_check.rs; required)
//   --timeout-ms N     limit for the whole run (default 300000)
//   --chromium PATH    the browser (default $CHROMIUM or /usr/bin/chromium)
//
// Prints one JSON line on stdout: the answer, with "userAgent".
// Everything else (browser console, page errors) goes to stderr.
// Exit status: 0 answered, 1 error / no WebGPU / timeout, 2 bad arguments.

import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';
import { chromiumArgs } from './chromium.mjs';

const USAGE = 'usage: node tests/kernels.mjs --url URL --request FILE [--timeout-ms N] [--chromium PATH]';

function usage(message) {
  console.error(`kernels.mjs: ${message}\n${USAGE}`);
  process.exit(2);
}

function options() {
  let values;
  try {
    ({ values } = parseArgs({
      options: {
        url: { type: 'string' },
        request: { type: 'string' },
        'timeout-ms': { type: 'string', default: '300000' },
        chromium: { type: 'string', default: process.env.CHROMIUM || '/usr/bin/chromium' },
      },
    }));
  } catch (err) {
    usage(err.message);
  }
  if (!values.url || !URL.canParse(values.url)) usage('--url URL is required');
  if (!values.request) usage('--request FILE is required');
  const timeoutMs = Number(values['timeout-ms']);
  if (!(timeoutMs > 0)) usage('--timeout-ms must be a positive number');
  return { ...values, timeoutMs };
}

async function main() {
  const opts = options();
  const request = readFileSync(opts.request, 'utf8');
  const browser = await chromium.launch({
    executablePath: opts.chromium,
    headless: true,
    args: chromiumArgs(),
    timeout: Math.min(opts.timeoutMs, 120000),
  });
  try {
    const page = await browser.newPage();
    page.setDefaultTimeout(opts.timeoutMs);
    page.on('console', (m) => console.error(`[browser] ${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => console.error(`[browser] page error: ${e.message}`));
    // any page of the origin: the bundle is imported from there
    const bundle = new URL('pkg/memlayer_web.js', opts.url).href;
    await page.goto(bundle);
    const answer = await page.evaluate(async ({ bundle, request }) => {
      if (!navigator.gpu) throw new Error('no WebGPU in this browser (navigator.gpu is undefined)');
      const m = await import(bundle);
      await m.default();
      return JSON.parse(await m.kernelCheck(request));
    }, { bundle, request });
    answer.userAgent = await page.evaluate(() => navigator.userAgent);
    process.stdout.write(JSON.stringify(answer) + '\n');
  } finally {
    await browser.close();
  }
}

main().catch((err) => {
  console.error(`kernels.mjs: ${err?.stack ?? err}`);
  process.exit(1);
});
