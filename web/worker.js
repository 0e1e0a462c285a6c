// memlayer browser chat: the module worker that owns the wasm engine.
//
// Everything that touches WebGPU or the model runs here, off the main thread.
// Protocol (see app.js):
//   main → worker  {type:'load', modelUrl, budgetPercent, localCopy?}  (localCopy: 'opfs' | 'cache' | 'none')
//                  {type:'generate', id, prompt, maxTokens, temperature, topP, seed}
//                  {type:'clear-cache'}
//                  {type:'prefetch', seq, text}   (the question being typed)
//   worker → main  {type:'progress', message}      {type:'nogpu', message}
//                  {type:'device', info}           {type:'ready', model, stats}
//                  {type:'piece', id, piece, stats} {type:'done', id, result, stats}
//                  {type:'error', id?, message}
//                  {type:'stats', stats}           (after 'clear-cache' or 'prefetch')
// Every stats object carries the browser's storage (storageUsage, storageQuota,
// storagePersisted, localCopyBytes, localCopyLimit, localCopyTrims, storageNotice).
// Messages are handled one at a time, in order; every failure is reported as
// an 'error' message, never dropped.

/** The wasm module (./pkg/memlayer_web.js), once imported and initialised. */
let wasm = null;
/** The loaded ChatEngine, or null before 'ready'. */
let engine = null;

const post = (msg) => self.postMessage(msg);

/** A readable message from anything thrown (Error, string, JsValue). */
function messageOf(err) {
  if (err instanceof Error) return err.message || String(err);
  if (typeof err === 'string') return err;
  try { return JSON.stringify(err); } catch { return String(err); }
}

/** Turns what wasm-bindgen hands back into structured-clone-friendly plain
 *  data: Map → object, BigInt → number (the engine returns JSON-parsed
 *  objects today; this keeps postMessage safe if that changes). */
function plain(v) {
  if (typeof v === 'bigint') return Number(v);
  if (v instanceof Map) return Object.fromEntries([...v].map(([k, x]) => [k, plain(x)]));
  if (Array.isArray(v)) return v.map(plain);
  if (v && typeof v === 'object') {
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, plain(x)]));
  }
  return v;
}

/** engine.stats() as plain data, or null if the engine cannot report now. */
function currentStats() {
  try { return engine ? plain(engine.stats()) : null; } catch { return null; }
}

/** Imports and initialises the wasm bundle (dynamic import so that a missing
 *  or broken bundle becomes an 'error' message instead of a silent worker failure). */
async function loadWasm() {
  if (wasm) return wasm;
  let mod;
  try {
    mod = await import('./pkg/memlayer_web.js');
  } catch (err) {
    throw new Error(`could not load the wasm bundle ./pkg/memlayer_web.js (build it with ` +
      `scripts/build-web.sh): ${messageOf(err)}`);
  }
  try {
    await mod.default();
  } catch (err) {
    throw new Error(`could not initialise memlayer_web_bg.wasm: ${messageOf(err)}`);
  }
  wasm = mod;
  return wasm;
}

/** Why WebGPU cannot be used here, or null if an adapter is available. */
async function gpuProblem() {
  const reason = wasm.webgpuSupport();
  if (reason) return reason;
  if (!self.navigator.gpu) return 'navigator.gpu is not available in this worker';
  // navigator.gpu can exist with no adapter behind it (blocklisted or disabled GPU,
  // the usual case on Linux without --enable-unsafe-webgpu): check before loading.
  const adapter = await self.navigator.gpu.requestAdapter().catch(() => null);
  if (!adapter) return 'navigator.gpu exists but requestAdapter() found no GPU adapter';
  return null;
}

/** 'load': wasm, WebGPU check, then the model (config, tokenizer, weights, bank index). */
async function load({ modelUrl, budgetPercent, localCopy }) {
  post({ type: 'progress', message: 'loading the wasm engine…' });
  await loadWasm();
  const problem = await gpuProblem();
  if (problem) {
    post({ type: 'nogpu', message: problem });
    return;
  }
  post({ type: 'progress', message: `loading the model from ${modelUrl}…` });
  engine = await wasm.ChatEngine.load(modelUrl, budgetPercent, (message) => {
    post({ type: 'progress', message: String(message) });
  }, localCopy || undefined);
  post({ type: 'device', info: plain(engine.deviceInfo()) });
  post({ type: 'ready', model: plain(engine.modelInfo()), stats: currentStats() });
}

/** 'generate': streams pieces (each with the stats after it), then 'done'. */
async function generate({ id, prompt, maxTokens, temperature, topP, seed }) {
  if (!engine) throw new Error('the model is not loaded');
  // The engine passes each piece with the counters after it.
  const onPiece = (piece, stats) => {
    // Never let an exception escape into the wasm caller.
    try { post({ type: 'piece', id, piece: String(piece), stats: plain(stats) }); } catch { /* ignore */ }
  };
  // seed is a JS number (the binding takes an f64 and checks it is a whole number)
  const result = await engine.generate(prompt, maxTokens, temperature, topP, seed, onPiece);
  post({ type: 'done', id, result: plain(result), stats: currentStats() });
}

/** 'clear-cache': empties the browser's copy of the pages (OPFS or Cache API). */
async function clearCache() {
  if (engine) {
    await engine.clearPageCache();
  } else if (self.caches) {
    // No engine (e.g. the load failed): drop every cache of this origin.
    for (const name of await caches.keys()) await caches.delete(name);
  }
  post({ type: 'progress', message: 'the page cache is cleared' });
  post({ type: 'stats', stats: currentStats() });
}

/** The newest 'prefetch' request: older ones still queued are dropped. */
let latestPrefetch = 0;
self.addEventListener('message', (event) => {
  if (event.data?.type === 'prefetch') latestPrefetch = Math.max(latestPrefetch, event.data.seq | 0);
});

/** 'prefetch': fetches the memory blocks of `text`'s route ahead of its
 *  generation (a hierarchical memory; nothing for other models). */
async function prefetch({ seq, text }) {
  if (!engine || (seq | 0) !== latestPrefetch) return;
  const fetched = await engine.prefetch(String(text));
  if (fetched > 0) post({ type: 'stats', stats: currentStats() });
}

const handlers = { load, generate, 'clear-cache': clearCache, prefetch };

/** Runs one message; any failure becomes an 'error' message carrying the request id. */
async function handle(msg) {
  const handler = handlers[msg?.type];
  try {
    if (!handler) throw new Error(`unknown message type ${JSON.stringify(msg?.type)}`);
    await handler(msg);
  } catch (err) {
    post({ type: 'error', id: msg?.id, message: messageOf(err) });
  }
}

// Serialise requests: each message starts after the previous one finished.
let queue = Promise.resolve();
self.addEventListener('message', (event) => {
  queue = queue.then(() => handle(event.data));
});

// Last-resort reporting for anything thrown outside handle().
self.addEventListener('error', (event) => {
  post({ type: 'error', message: `worker: ${event.message || messageOf(event.error)}` });
});
self.addEventListener('unhandledrejection', (event) => {
  post({ type: 'error', message: `worker: ${messageOf(event.reason)}` });
});
