// memlayer browser chat: the main-thread side.
//
// Starts worker.js (which runs the wasm engine on WebGPU), forwards prompts to
// it and renders what comes back: the streamed answer, the device line and the
// live memory counters. URL query parameters:
//   ?budget=25        memory budget, % of the bank (default 25)
//   ?max_tokens=24    ?seed=0   ?temperature=0   ?top_p=1   sampling defaults
//   ?prompt=TEXT      prefill the prompt box;  ?autorun=1  send it once ready
//   ?model=URL        model directory (default /model/)
//   ?local_copy=cache where fetched pages are kept: opfs (default), cache, none
// At load it asks the browser to keep this origin's storage
// (navigator.storage.persist()); the status line says how much the local page
// copy holds, of what quota, and whether the storage is persistent.
// For tests it exposes window.memlayerTurns / memlayerLast / memlayerError /
// memlayerDevice / memlayerModel / memlayerLoadSeconds / memlayerPersist /
// memlayerStorageNotice and body[data-turns].

const $ = (id) => document.getElementById(id);

// ---- Settings from the URL -------------------------------------------------

const params = new URLSearchParams(location.search);

/** A number from the query string, or `fallback` if absent or not finite. */
function numParam(name, fallback) {
  const raw = params.get(name);
  const v = raw === null || raw.trim() === '' ? NaN : Number(raw);
  return Number.isFinite(v) ? v : fallback;
}

const config = {
  modelUrl: new URL(params.get('model') || '/model/', location.href).href,
  budgetPercent: numParam('budget', 25),
  localCopy: params.get('local_copy') || undefined,
  autorun: params.get('autorun') === '1',
};

// ---- DOM -------------------------------------------------------------------

const el = {
  status: $('status'),
  device: $('device'),
  nogpu: $('nogpu'),
  nogpuReason: $('nogpu-reason'),
  transcript: $('transcript'),
  form: $('prompt-form'),
  prompt: $('prompt'),
  send: $('send'),
  maxTokens: $('max-tokens'),
  temperature: $('temperature'),
  topP: $('top-p'),
  seed: $('seed'),
  clearCache: $('clear-cache'),
  storageNotice: $('storage-notice'),
  modelInfo: $('model-info'),
  modelLink: $('model-link'),
  stat: {
    budget: $('stat-budget'),
    resident: $('stat-resident'),
    streamed: $('stat-streamed'),
    bytes: $('stat-bytes'),
    hitrate: $('stat-hitrate'),
    evictions: $('stat-evictions'),
    blocks: $('stat-blocks'),
    storage: $('stat-storage'),
    time: $('stat-time'),
    toks: $('stat-toks'),
  },
};

el.maxTokens.value = numParam('max_tokens', 24);
el.seed.value = numParam('seed', 0);
el.temperature.value = numParam('temperature', 0);
el.topP.value = numParam('top_p', 1);
if (params.has('prompt')) el.prompt.value = params.get('prompt');
el.modelLink.href = new URL('config.json', config.modelUrl).href;

// ---- State -----------------------------------------------------------------

const app = {
  state: 'loading',   // mirrors #status[data-state]
  loaded: false,      // the engine is ready to generate
  model: null,        // engine.modelInfo()
  stats: null,        // the latest engine.stats()
  turnsStarted: 0,    // turn n samples with seed + n
  pending: null,      // the turn being generated: {id, prompt, seed, turnEl, answerEl, text}
  autorunDone: false,
};

window.memlayerTurns = [];
window.memlayerLast = null;
window.memlayerError = null;
window.memlayerStorageNotice = null;
document.body.dataset.turns = '0';

// ---- Formatting ------------------------------------------------------------

const MiB = 1024 * 1024;
const mib = (bytes) => (bytes / MiB).toFixed(2);
const pct = (fraction) => `${(fraction * 100).toFixed(1)} %`;
const fixed = (x, digits) => (Number.isFinite(x) ? x.toFixed(digits) : '–');

/** A byte count in plain words: KiB, MiB or GiB. */
function bytesText(bytes) {
  if (!(bytes >= 0)) return '?';
  if (bytes >= 1024 * MiB) return `${(bytes / (1024 * MiB)).toFixed(1)} GiB`;
  if (bytes >= MiB) return `${(bytes / MiB).toFixed(1)} MiB`;
  return `${(bytes / 1024).toFixed(1)} KiB`;
}

/** The storage in plain words, e.g. "local copy: 3.1 MiB of 2.0 GiB quota,
 *  persistent" (empty before the engine reports it, or without a copy). */
function storageText(s) {
  if (!s || s.storageQuota === undefined || app.model?.localCopy === 'none') return '';
  const quota = s.storageQuota > 0 ? ` of ${bytesText(s.storageQuota)} quota` : '';
  const kept = s.storagePersisted ? 'persistent' : 'not persistent (the browser may clear it)';
  const trimmed = s.localCopyTrims > 0 ? `, trimmed ${s.localCopyTrims}× at the quota` : '';
  return `local copy: ${bytesText(s.localCopyBytes)}${quota}, ${kept}${trimmed}`;
}

/** Sets the status line and its data-state; a ready line ends with the storage. */
function setStatus(state, text) {
  app.state = state;
  el.status.dataset.state = state;
  const storage = state === 'ready' ? storageText(app.stats) : '';
  el.status.textContent = storage ? `${text} ${storage.charAt(0).toUpperCase()}${storage.slice(1)}.` : text;
  updateControls();
}

/** Tells the page, once per trim, that the quota was reached and the local
 *  copy trimmed (the engine keeps answering from the network). */
function showStorageNotice(s) {
  if (!s?.storageNotice || (s.localCopyTrims ?? 0) <= (app.trimsShown ?? 0)) return;
  app.trimsShown = s.localCopyTrims;
  window.memlayerStorageNotice = s.storageNotice;
  if (el.storageNotice) {
    el.storageNotice.textContent = s.storageNotice.charAt(0).toUpperCase() + s.storageNotice.slice(1) + '.';
    el.storageNotice.hidden = false;
  }
}

/** Enables the send and clear-cache buttons only when the engine is idle. */
function updateControls() {
  const idle = app.loaded && !app.pending;
  el.send.disabled = !idle;
  el.clearCache.disabled = !idle;
}

/** The one-line description of the WebGPU device in #device. */
function renderDevice(info) {
  const l = info.limits || {};
  const parts = [
    info.adapter || [info.vendor, info.architecture].filter(Boolean).join(' ') || 'WebGPU adapter',
    info.backend,
    l.maxStorageBufferBindingSize > 0 && `max storage binding ${mib(l.maxStorageBufferBindingSize)} MiB`,
    l.maxStorageBuffersPerShaderStage > 0 && `${l.maxStorageBuffersPerShaderStage} storage buffers/stage`,
    (info.features || []).includes('shader-f16') && 'shader-f16',
  ];
  el.device.textContent = parts.filter(Boolean).join(' · ');
}

/** The model summary under the counters. */
function renderModel(m) {
  const layers = (m.memoryLayers || []).join(', ');
  el.modelInfo.textContent = [
    `dim ${m.dim}, ${m.nLayers} layers, vocab ${m.vocabSize}`,
    layers ? `product-key memory in layer ${layers}: ${m.valueRows} value rows` : 'no product-key memory',
    m.blockLevels > 0
      ? `hierarchical memory: ${m.blockLevels} levels, one block each${m.prefetch ? ' (fetched while you type)' : ''}`
      : 'no hierarchical memory',
    layers
      ? `bank ${mib(m.bankBytes)} MiB as f32, ${m.bankPages} value pages; ${m.slots} page slots`
      : `bank ${mib(m.bankBytes)} MiB as f32`,
    `dense weights ${mib(m.denseBytes)} MiB`,
    `pages kept in: ${m.localCopy ?? '?'}`,
  ].join('\n');
}

/** Writes a counter: the main value, and an optional smaller line under it. */
function setStat(dd, main, sub) {
  dd.textContent = main;
  if (sub) {
    const small = document.createElement('span');
    small.className = 'sub';
    small.textContent = sub;
    dd.append(small);
  }
}

/** The memory counters in #panel (cumulative since the page loaded). */
function renderStats(s) {
  if (!s) return;
  app.stats = s;
  const bankBytes = app.model?.bankBytes;
  const bankPages = s.bankPages ?? app.model?.bankPages;
  setStat(el.stat.budget, `${mib(s.budgetBytes)} MiB`,
    bankBytes ? `${pct(s.budgetBytes / bankBytes)} of bank` : '');
  setStat(el.stat.resident, `${s.residentPages} / ${bankPages}`);
  const local = app.model?.localCopy && app.model.localCopy !== 'none' ? app.model.localCopy : 'browser copy';
  setStat(el.stat.streamed, String(s.pagesStreamed), `(${s.pagesFromCache} from ${local})`);
  setStat(el.stat.bytes, `${mib(s.bytesStreamed)} MiB`);
  // value pages and blocks together (the engine's hitRate)
  setStat(el.stat.hitrate, s.accesses + (s.blockRequests ?? 0) > 0 ? pct(s.hitRate) : '–');
  setStat(el.stat.evictions, String(s.evictions));
  if (el.stat.blocks) {
    setStat(el.stat.blocks, s.blockRequests > 0 ? `${s.blockHits} / ${s.blockRequests}` : '–',
      s.blockRequests > 0 ? 'held when asked' : '');
  }
  if (el.stat.time) {
    setStat(el.stat.time, `${(s.fetchSeconds ?? 0).toFixed(2)} s / ${(s.deviceSeconds ?? 0).toFixed(2)} s`);
  }
  if (el.stat.storage && s.storageQuota !== undefined) {
    setStat(el.stat.storage, bytesText(s.localCopyBytes),
      [s.storageQuota > 0 && `quota ${bytesText(s.storageQuota)}`,
        s.storagePersisted ? 'persistent' : 'not persistent',
        s.localCopyTrims > 0 && `trimmed ${s.localCopyTrims}×, ${s.pagesNotKept} pages not kept`]
        .filter(Boolean).join(' · '));
  }
  showStorageNotice(s);
}

/** Decode speed and time to first token of the last answer. */
function renderSpeed(r) {
  if (!r) {
    setStat(el.stat.toks, '–');
    return;
  }
  setStat(el.stat.toks, `${fixed(r.tokensPerSecond, 1)} tok/s`,
    `first token ${fixed(r.firstTokenSeconds, 2)} s`);
}

/** Shows the no-WebGPU notice. */
function showNoGpu(reason) {
  app.loaded = false;
  el.nogpu.hidden = false;
  el.nogpuReason.textContent = reason;
  el.device.textContent = 'no WebGPU';
  setStatus('nogpu', `No WebGPU: ${reason}. This page has no CPU fallback.`);
}

/** Records an error for tests and shows it on the status line. */
function showError(message) {
  window.memlayerError = message;
  setStatus('error', `Error: ${message}`);
}

// ---- Transcript ------------------------------------------------------------

/** Appends a turn (prompt + empty answer) and moves id="answer" to its answer. */
function addTurn(prompt, seed) {
  el.transcript.querySelector('.empty')?.remove();
  $('answer')?.removeAttribute('id');

  const turnEl = document.createElement('article');
  turnEl.className = 'turn streaming';
  turnEl.innerHTML = `
    <div class="msg user"><span class="who">prompt</span><span class="body"></span></div>
    <div class="msg model"><span class="who">memlayer</span><span class="body"><span class="echo">…</span><span class="answer" id="answer"></span></span></div>
    <div class="meta">seed ${seed}</div>`;
  turnEl.querySelector('.user .body').textContent = prompt;
  el.transcript.append(turnEl);
  scrollTranscript();
  return { turnEl, answerEl: turnEl.querySelector('.answer') };
}

function scrollTranscript() {
  el.transcript.scrollTop = el.transcript.scrollHeight;
}

// ---- Sending a prompt ------------------------------------------------------

/** An input's numeric value, or `fallback` if empty or invalid. */
function inputNumber(input, fallback) {
  const v = input.valueAsNumber;
  return Number.isFinite(v) ? v : fallback;
}

/** Sends the prompt box as a new turn (no-op while busy or not loaded). */
function send() {
  if (!app.loaded || app.pending) return;
  const prompt = el.prompt.value.replace(/[\r\n]+$/, '');
  if (!prompt.trim()) {
    el.prompt.focus();
    return;
  }
  const n = app.turnsStarted++;
  const seed = Math.max(0, Math.floor(inputNumber(el.seed, 0))) + n;
  const request = {
    type: 'generate',
    id: n,
    prompt,
    maxTokens: Math.max(1, Math.floor(inputNumber(el.maxTokens, 24))),
    temperature: Math.max(0, inputNumber(el.temperature, 0)),
    topP: Math.min(1, Math.max(0, inputNumber(el.topP, 1))),
    seed,
  };
  app.pending = { id: n, prompt, seed, text: '', ...addTurn(prompt, seed) };
  el.prompt.value = '';
  el.stat.toks.textContent = 'generating…';
  setStatus('generating', `Generating (turn ${n + 1}, seed ${seed})…`);
  worker.postMessage(request);
}

/** A finished turn: final text, per-turn line, test hooks. */
function finishTurn(p, result, stats) {
  p.answerEl.textContent = result.text;
  p.turnEl.classList.remove('streaming');
  p.turnEl.querySelector('.meta').textContent =
    `${result.tokens} tokens (prompt ${result.promptTokens}) · ${fixed(result.tokensPerSecond, 1)} tok/s · ` +
    `first token ${fixed(result.firstTokenSeconds, 2)} s · ${fixed(result.seconds, 2)} s · seed ${p.seed}`;
  renderStats(stats);
  renderSpeed(result);

  const turn = { prompt: p.prompt, text: result.text, result, stats };
  window.memlayerLast = turn;
  window.memlayerTurns.push(turn);
  document.body.dataset.turns = String(window.memlayerTurns.length);
}

/** A failed turn: the error replaces the answer. */
function failTurn(p, message) {
  p.answerEl.classList.add('failed');
  p.answerEl.textContent = p.text ? `${p.text} [failed: ${message}]` : `[failed: ${message}]`;
  p.turnEl.classList.remove('streaming');
  p.turnEl.querySelector('.meta').textContent = `failed · seed ${p.seed}`;
  renderSpeed(window.memlayerLast?.result);
}

// ---- Prefetching the question being typed -----------------------------------

/** Asks the worker to fetch the memory blocks of the prompt box's text (a
 *  hierarchical memory routes each context to one block per level), so the
 *  answer finds them resident. Debounced; the worker drops stale requests. */
let prefetchTimer = null;
let prefetchSeq = 0;
function schedulePrefetch() {
  clearTimeout(prefetchTimer);
  prefetchTimer = setTimeout(() => {
    const text = el.prompt.value.trim();
    if (!worker || !app.loaded || app.pending || !app.model?.prefetch || !text) return;
    worker.postMessage({ type: 'prefetch', seq: ++prefetchSeq, text });
  }, 300);
}

// ---- Worker messages -------------------------------------------------------

/** Handles one message from worker.js. */
function onWorkerMessage({ data: msg }) {
  const p = app.pending;
  switch (msg.type) {
    case 'progress':
      if (app.loaded) el.status.textContent = `Ready (${msg.message}).`;
      else setStatus('loading', `Loading: ${msg.message}`);
      break;
    case 'nogpu':
      showNoGpu(msg.message);
      break;
    case 'device':
      window.memlayerDevice = msg.info;
      renderDevice(msg.info);
      break;
    case 'ready':
      app.loaded = true;
      app.model = msg.model;
      window.memlayerModel = msg.model;
      window.memlayerLoadSeconds = performance.now() / 1000;
      renderModel(msg.model);
      renderStats(msg.stats);
      setStatus('ready', `Ready: model loaded in ${window.memlayerLoadSeconds.toFixed(1)} s. ` +
        `Type a prompt; the model completes it up to the end of the line.`);
      if (config.autorun && !app.autorunDone) {
        app.autorunDone = true;
        send();
      } else {
        schedulePrefetch();
      }
      break;
    case 'piece':
      if (!p || msg.id !== p.id) break;
      p.text += msg.piece;
      p.answerEl.textContent = p.text;
      renderStats(msg.stats);
      scrollTranscript();
      break;
    case 'stats':
      renderStats(msg.stats);
      break;
    case 'done':
      if (!p || msg.id !== p.id) break;
      app.pending = null;
      finishTurn(p, msg.result, msg.stats);
      setStatus('ready', `Ready. Last answer: ${msg.result.tokens} tokens at ` +
        `${fixed(msg.result.tokensPerSecond, 1)} tok/s.`);
      break;
    case 'error':
      if (p && msg.id === p.id) {
        app.pending = null;
        failTurn(p, msg.message);
      }
      showError(msg.message);
      break;
    default:
      console.warn('memlayer: unknown worker message', msg);
  }
}

/** The worker itself died (script failed to load, or an uncaught error). */
function onWorkerFailure(message) {
  if (app.pending) failTurn(app.pending, message);
  app.pending = null;
  app.loaded = false;
  showError(message);
}

// ---- Start-up --------------------------------------------------------------

el.form.addEventListener('submit', (event) => {
  event.preventDefault();
  send();
});
el.prompt.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
el.prompt.addEventListener('input', schedulePrefetch);
el.clearCache.addEventListener('click', () => {
  if (!app.loaded || app.pending) return;
  el.status.textContent = 'Clearing the page cache…';
  worker.postMessage({ type: 'clear-cache' });
});
window.addEventListener('unhandledrejection', (event) => {
  showError(String(event.reason?.message ?? event.reason));
});

let worker = null;
if (!navigator.gpu) {
  // No WebGPU on this page: the engine cannot run, so the worker is not started.
  showNoGpu(window.isSecureContext
    ? 'navigator.gpu is undefined in this browser'
    : 'navigator.gpu is undefined because the page is not a secure context (open it via localhost or https)');
} else {
  worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
  worker.addEventListener('message', onWorkerMessage);
  worker.addEventListener('error', (event) => {
    event.preventDefault();
    onWorkerFailure(`the worker failed: ${event.message || 'could not start worker.js'}`);
  });
  worker.addEventListener('messageerror', () => onWorkerFailure('a worker message could not be decoded'));
  setStatus('loading', 'Loading: starting the worker…');
  // Ask the browser to keep the page copy (persist() exists on windows only;
  // Chromium grants or denies it without a prompt), then load.
  const persist = navigator.storage?.persist
    ? navigator.storage.persist().catch(() => false) : Promise.resolve(false);
  persist.then((granted) => {
    window.memlayerPersist = granted;
    worker.postMessage({
      type: 'load', modelUrl: config.modelUrl, budgetPercent: config.budgetPercent,
      localCopy: config.localCopy,
    });
  });
}
