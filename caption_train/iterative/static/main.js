// caption-train interactive page: live training status over a websocket, actions as JSON messages
// (schema: caption_train/iterative/schema.py). Plain browser JavaScript, no build step, no dependencies.
"use strict";

const TOKEN = document.querySelector('meta[name="caption-train-token"]').content;
const PAGE_SIZE = 24;
const $ = (id) => document.getElementById(id);

const QUEUE_VIEWS = new Set(["suspects", "not_down"]);  // the review queue: most suspect caption first

const ui = {
  view: null,        // set from the hello message: the queue when losses exist, else "probe" when training has sample images
  viewChosen: false, // the person picked a view: the page no longer switches to the queue by itself
  current: -1,       // index (in ui.cards) of the card the keys act on
  rankedWith: 0,     // the loss epoch the queue shown was ranked with
  loads: 0,          // gallery loads started: only the latest one's answer is shown
  query: "",
  offset: 0,
  total: 0,
  status: null,
  cards: new Map(),  // image id -> card element
  ws: null,
  mode: null,        // "training" or "review": which help text and words the page shows
  retry: 500,
  requestId: 0,
};

// ---------------------------------------------------------------- talking to the server

async function getJSON(path) {
  const response = await fetch(path, { headers: { "X-Caption-Train-Token": TOKEN }, cache: "no-store" });
  const body = await response.json();
  if (!response.ok) throw new Error(body.payload ? body.payload.message : response.statusText);
  return body;
}

async function send(type, payload) {
  const id = `r${++ui.requestId}`;
  const response = await fetch("/api/message", {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Caption-Train-Token": TOKEN },
    body: JSON.stringify({ req_from: "client", type, payload, id }),
  });
  let reply;
  try {
    reply = await response.json();
  } catch (error) {
    reply = { type: "error", payload: { message: `${response.status} ${response.statusText}` } };
  }
  if (reply.type === "error") {
    const details = (reply.payload.details || []).map((d) => `${d.loc}: ${d.msg}`).join("; ");
    toast(reply.payload.message + (details ? ` (${details})` : ""), true);
    throw new Error(reply.payload.message);
  }
  return reply.payload.detail || {};
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/ws?token=${encodeURIComponent(TOKEN)}`);
  ui.ws = ws;
  ws.onopen = () => { ui.retry = 500; };
  ws.onmessage = (event) => handle(JSON.parse(event.data));
  ws.onclose = () => {
    const finished = ui.status && ui.status.state === "finished";
    setState(finished ? "finished" : "disconnected", finished ? "finished" : "disconnected");
    if (!finished) setTimeout(connect, ui.retry);
    ui.retry = Math.min(ui.retry * 2, 8000);
  };
}

function handle(message) {
  const payload = message.payload;
  switch (message.type) {
    case "hello":
      if (ui.view === null) {  // showStatus then opens the queue instead when losses exist (showQueue)
        ui.view = payload.probe.length ? "probe" : "all";
        $("view").value = ui.view;
        if (!payload.probe.length) $("view").querySelector('option[value="probe"]').hidden = true;
      }
      if (!showStatus(payload.status)) loadGallery(0);
      break;
    case "status": showStatus(payload); break;
    case "caption_updated": updateCard(payload); break;
    case "model_captions": payload.captions.forEach(updateCard); break;
    case "saved": toast(`saved ${payload.path}`); break;
    case "error": toast(payload.message, true); break;
    default: break;
  }
}

// ---------------------------------------------------------------- header

function fmt(value, digits) {
  if (value === null || value === undefined) return "–";
  return Math.abs(value) < 1e-3 && value !== 0 ? value.toExponential(2) : value.toFixed(digits);
}

function setState(cls, text) {
  const el = $("state");
  el.className = `state state-${cls}`;
  el.textContent = text;
}

// Words that depend on what a rating of 1 does: in training it leaves the image out; in review nothing trains.
const MODE_WORDS = {
  training: { excluded: "excluded from training", rateBad: "1: bad, leave out of training", viewBad: "excluded (rated 1)" },
  review: { excluded: "rated 1 (bad)", rateBad: "1: bad", viewBad: "bad (rated 1)" },
};

function words() {
  return MODE_WORDS[ui.status && ui.status.mode === "review" ? "review" : "training"];
}

function applyMode(mode) {
  if (ui.mode === mode) return;
  ui.mode = mode;
  for (const el of document.querySelectorAll("[data-mode]")) el.hidden = el.dataset.mode !== mode;
  $("view").querySelector('option[value="excluded"]').textContent = words().viewBad;
}

function showStatus(s) {
  ui.status = s;
  applyMode(s.mode);
  const training = s.mode === "training";
  $("mode").textContent = s.mode;
  $("training-stats").hidden = !training;
  $("review-stats").hidden = training;
  $("pause").hidden = !training || s.state === "finished";
  $("save").hidden = !training || s.state === "finished";
  if (training) {
    $("epoch").textContent = s.epoch ? `${s.epoch} / ${s.epochs}` : "–";
    $("step").textContent = `${s.step} / ${s.total_steps}`;
    $("loss").textContent = fmt(s.loss, 4);
    $("lr").textContent = s.lr === null ? "–" : s.lr.toExponential(2);
    $("val-loss").textContent = fmt(s.val_loss, 4);
    $("progress-bar").style.width = `${s.total_steps ? (100 * s.step) / s.total_steps : 0}%`;
  } else {
    $("model-name").textContent = s.model || "none (edit and rate only)";
  }
  if (s.state === "running" && s.pause_requested) setState("pausing", "pausing…");
  else setState(s.state, s.state);
  $("pause").textContent = s.pause_requested ? "Resume" : "Pause";
  $("pause").classList.toggle("primary", s.pause_requested);
  for (const key of ["images", "modified", "rated", "excluded", "gold"]) $(`count-${key}`).textContent = s[key];
  $("count-pending").textContent = s.pending_captions;
  $("caption-shown").disabled = !s.can_generate;
  for (const card of ui.cards.values()) card.querySelector(".caption-now").disabled = !s.can_generate;
  return showQueue(s);
}

// The review queue appears once per-image losses exist (training: after the first epoch). The page opens on it
// then, unless the person picked a view; a queue on screen is not reordered under them when an epoch's losses
// come in: the Re-rank button (key r) offers the new order. True when it switched to the queue (and loads it).
function showQueue(s) {
  const ranked = s.ranked > 0;
  for (const view of QUEUE_VIEWS) $("view").querySelector(`option[value="${view}"]`).hidden = !ranked;
  $("queue-help").hidden = !ranked;
  $("queue-counter").hidden = !ranked;
  $("count-suspects").textContent = s.suspects;
  if (ranked && !ui.viewChosen && ui.view !== null && !QUEUE_VIEWS.has(ui.view)) {
    ui.view = "suspects";
    $("view").value = ui.view;
    ui.offset = 0;
    loadGallery(0);
    return true;
  }
  const stale = QUEUE_VIEWS.has(ui.view) && ui.rankedWith !== 0 && s.loss_epoch !== ui.rankedWith;
  $("refresh-queue").hidden = !stale;
  if (stale) $("refresh-queue").textContent = `Re-rank (epoch ${s.loss_epoch})`;
  return false;
}

// ---------------------------------------------------------------- gallery

// `select`: the card the keys act on afterwards: an index, or "last".
async function loadGallery(select = 0) {
  const params = new URLSearchParams({ view: ui.view, q: ui.query, offset: ui.offset, limit: PAGE_SIZE });
  const lossEpoch = ui.status ? ui.status.loss_epoch : 0;
  const load = ++ui.loads;
  let body;
  try {
    body = await getJSON(`/api/images?${params}`);
  } catch (error) {
    toast(error.message, true);
    return;
  }
  if (load !== ui.loads) return;  // a later load (a quicker key) is on its way: it wins
  ui.total = body.total;
  ui.rankedWith = QUEUE_VIEWS.has(ui.view) ? lossEpoch : 0;
  $("refresh-queue").hidden = true;
  const gallery = $("gallery");
  gallery.replaceChildren();
  ui.cards.clear();
  for (const info of body.images) {
    const card = makeCard(info);
    ui.cards.set(info.id, card);
    gallery.appendChild(card);
  }
  fitAllCaptions();  // now that they are laid out
  if (!body.images.length) {
    const empty = document.createElement("div");
    empty.className = "empty-gallery";
    empty.textContent = "No images here.";
    gallery.appendChild(empty);
  }
  // Review mode with a model: show the model's captions beside the ones on disk without a click.
  if (ui.status && ui.status.mode === "review" && ui.status.can_generate) {
    const missing = body.images.filter((info) => !info.model_caption).map((info) => info.id);
    if (missing.length) send("caption_generate", { images: missing.slice(0, 32) }).catch(() => {});
  }
  const last = Math.min(ui.offset + PAGE_SIZE, ui.total);
  $("page-info").textContent = ui.total ? `${ui.offset + 1}–${last} of ${ui.total}` : "0";
  $("prev").disabled = ui.offset === 0;
  $("next").disabled = last >= ui.total;
  ui.current = -1;
  if (ui.cards.size) setCurrent(select === "last" ? ui.cards.size - 1 : Math.min(select, ui.cards.size - 1), select !== 0 || ui.offset !== 0);
}

// A caption box as tall as its text (up to the CSS max-height), so a long caption never scrolls inside a
// small box. Works in every browser (CSS field-sizing is Chromium-only); re-run when the width changes.
function fitCaption(textarea) {
  if (!textarea.isConnected) return;
  textarea.style.height = "auto";
  const borders = textarea.offsetHeight - textarea.clientHeight;
  textarea.style.height = `${textarea.scrollHeight + borders}px`;
}

function fitAllCaptions() {
  for (const card of ui.cards.values()) fitCaption(card.querySelector(".caption"));
}

function makeCard(info) {
  const card = $("card-template").content.firstElementChild.cloneNode(true);
  card.dataset.id = info.id;
  const img = card.querySelector("img");
  img.src = `/api/image/${info.id}?token=${encodeURIComponent(TOKEN)}`;
  img.alt = info.path;
  const textarea = card.querySelector(".caption");
  const saveButton = card.querySelector(".save-caption");
  const revertButton = card.querySelector(".revert");
  textarea.addEventListener("input", () => {
    fitCaption(textarea);
    const dirty = textarea.value !== card.dataset.caption;
    textarea.classList.toggle("dirty", dirty);
    saveButton.disabled = !dirty || !textarea.value.trim();
    revertButton.disabled = !dirty;
  });
  textarea.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      // In the queue, saving a fix ends this card's turn: the keys go on with the next one.
      saveCaption(card).then((saved) => { if (saved && QUEUE_VIEWS.has(ui.view)) { textarea.blur(); move(+1); } });
    } else if (event.key === "Escape") {
      event.preventDefault();
      textarea.blur();  // the keys act on the cards again
    }
  });
  card.addEventListener("focusin", () => setCurrent([...ui.cards.keys()].indexOf(info.id), false));
  card.querySelector(".fine").addEventListener("click", () => markFine(card, !card.classList.contains("is-fine")));
  saveButton.addEventListener("click", () => saveCaption(card));
  revertButton.addEventListener("click", () => { textarea.value = card.dataset.caption; textarea.dispatchEvent(new Event("input")); });
  card.querySelector(".caption-now").addEventListener("click", () => captionNow([info.id]));
  card.querySelector(".accept").addEventListener("click", () => act(card, "caption_accept", { image: info.id, model_caption: card.dataset.model }));
  for (const button of card.querySelectorAll(".rating button")) {
    button.addEventListener("click", () => act(card, "caption_quality", { image: info.id, quality: Number(button.dataset.q) }));
  }
  if (ui.status) card.querySelector(".caption-now").disabled = !ui.status.can_generate;
  card.querySelector('.rating button[data-q="1"]').title = words().rateBad;
  fillCard(card, info, true);
  return card;
}

function fillCard(card, info, fresh) {
  const textarea = card.querySelector(".caption");
  const typing = textarea.classList.contains("dirty");
  card.dataset.caption = info.caption;
  if (fresh || !typing) {
    textarea.value = info.caption;
    fitCaption(textarea);
    textarea.classList.remove("dirty");
    card.querySelector(".save-caption").disabled = true;
    card.querySelector(".revert").disabled = true;
  }
  card.querySelector(".path").textContent = info.path;
  card.querySelector(".path").title = info.path;
  const badges = card.querySelector(".badges");
  badges.replaceChildren();
  const badge = (cls, text) => { const el = document.createElement("span"); el.className = cls; el.textContent = text; badges.appendChild(el); };
  if (info.probe) badge("b-probe", "sample");
  if (info.modified) badge("b-modified", "modified");
  if (info.excluded) badge("b-excluded", words().excluded);
  if (info.rating === 5) badge("b-gold", "gold");
  if (info.loss && info.loss.fixed) badge("b-fixed", "fixed");
  if (info.loss && info.loss.fine) badge("b-fine", "fine");
  card.classList.toggle("excluded", info.excluded);
  fillLoss(card, info.loss);
  for (const button of card.querySelectorAll(".rating button")) button.classList.toggle("active", Number(button.dataset.q) === info.rating);
  const model = card.querySelector(".model-caption");
  const accept = card.querySelector(".accept");
  if (info.model_caption) {
    card.dataset.model = info.model_caption.text;
    model.textContent = info.model_caption.text || "(empty)";
    model.classList.remove("empty");
    model.classList.toggle("same", info.model_caption.text === info.caption);
    card.querySelector(".model-step").textContent = info.model_caption.step === null ? "" : `(step ${info.model_caption.step})`;
    accept.disabled = !info.model_caption.text.trim() || info.model_caption.text === info.caption;
  } else {
    delete card.dataset.model;
    accept.disabled = true;
  }
}

// The card's loss: its place in the queue, the latest epoch's loss, and a sparkline of every epoch's (the part
// measured on an earlier caption text drawn faint).
function fillLoss(card, loss) {
  const box = card.querySelector(".loss");
  const fine = card.querySelector(".fine");
  box.hidden = !loss;
  fine.hidden = !loss;
  card.classList.toggle("is-fine", Boolean(loss && loss.fine));
  card.classList.toggle("queued", Boolean(loss && loss.rank));
  if (!loss) return;
  const values = loss.losses.map((v) => (v === null ? NaN : v));
  const latest = values[values.length - 1];
  const first = values[loss.same_caption_from];
  box.querySelector(".rank").textContent = loss.rank ? `#${loss.rank}` : loss.fixed ? "fixed" : loss.fine ? "fine" : "–";
  box.querySelector(".loss-value").textContent = `loss ${fmtLoss(latest)}`;
  box.querySelector(".loss-arrow").textContent = loss.down === null ? "" : `${loss.down ? "↘" : "↗"} from ${fmtLoss(first)}`;
  box.querySelector(".loss-arrow").classList.toggle("not-down", loss.down === false);
  box.title = loss.epochs.map((epoch, i) => `epoch ${epoch}: ${fmtLoss(values[i])}`).join(", ")
    + (loss.same_caption_from ? ` (before epoch ${loss.epochs[loss.same_caption_from]}: an earlier caption)` : "")
    + (loss.fixed ? "; the caption changed since: out of the queue until its next loss" : "");
  drawSpark(box.querySelector(".spark"), values, loss.same_caption_from);
  fine.textContent = loss.fine ? "Not fine after all" : "Caption is fine";
}

function fmtLoss(value) {
  return Number.isFinite(value) ? value.toFixed(3) : String(value);
}

function drawSpark(svg, values, split) {
  const finite = values.filter(Number.isFinite);
  const low = Math.min(...finite), high = Math.max(...finite);
  const y = (v) => (Number.isFinite(v) ? 21 - (high > low ? ((v - low) / (high - low)) * 18 : 9) : 2).toFixed(1);
  const x = (i) => (values.length > 1 ? (i * 96) / (values.length - 1) + 2 : 50).toFixed(1);
  const points = values.map((v, i) => [x(i), y(v)]);
  if (points.length === 1) points.push([String(Number(points[0][0]) + 4), points[0][1]]);  // one epoch: a dash
  const join = (list) => list.map((p) => p.join(",")).join(" ");
  svg.querySelector(".earlier").setAttribute("points", join(points.slice(0, split + 1 > 1 ? split + 1 : 0)));
  svg.querySelector(".latest").setAttribute("points", join(points.slice(split)));
}

function updateCard(info) {
  const card = ui.cards.get(info.id);
  if (!card) return;
  fillCard(card, info, false);
  card.classList.add("flash");
  setTimeout(() => card.classList.remove("flash"), 600);
}

// True when saved.
async function saveCaption(card) {
  const textarea = card.querySelector(".caption");
  if (!textarea.value.trim() || textarea.value === card.dataset.caption) return false;
  card.classList.add("saving");
  try {
    const detail = await send("caption_new", { image: card.dataset.id, new_caption: textarea.value, previous: card.dataset.caption });
    fillCard(card, detail.image, true);
    toast(`saved caption of ${detail.image.path}`);
    return true;
  } catch (error) {
    return false;  // the toast already says why; keep the typed text so nothing is lost
  } finally {
    card.classList.remove("saving");
  }
}

// True when done.
async function markFine(card, fine) {
  try {
    const detail = await send("caption_fine", { image: card.dataset.id, fine, caption: card.dataset.caption });
    fillCard(card, detail.image, false);
    return true;
  } catch (error) {
    return false;  // toast shown
  }
}

// ---------------------------------------------------------------- the keys

function setCurrent(index, scroll = true) {
  const cards = [...ui.cards.values()];
  if (index < 0 || index >= cards.length || index === ui.current) return;
  if (ui.current >= 0 && cards[ui.current]) {
    cards[ui.current].classList.remove("current");
    cards[ui.current].removeAttribute("aria-current");
  }
  ui.current = index;
  cards[index].classList.add("current");
  cards[index].setAttribute("aria-current", "true");
  if (scroll) cards[index].scrollIntoView({ block: "center" });
}

// The next (+1) or previous (-1) card, across pages.
async function move(delta) {
  const index = ui.current + delta;
  if (index >= ui.cards.size) {
    if (ui.offset + PAGE_SIZE < ui.total) { ui.offset += PAGE_SIZE; await loadGallery(0); }
  } else if (index < 0) {
    if (ui.offset > 0) { ui.offset = Math.max(0, ui.offset - PAGE_SIZE); await loadGallery("last"); }
  } else {
    setCurrent(index);
  }
}

function currentCard() {
  return [...ui.cards.values()][ui.current] || null;
}

const KEYS = {
  j: () => move(+1),
  k: () => move(-1),
  s: () => move(+1),  // skip: leave it in the queue, go on
  a: async () => {
    const card = currentCard();
    if (card && card.querySelector(".loss").hidden === false && await markFine(card, true)) move(+1);
  },
  e: () => {
    const textarea = currentCard() && currentCard().querySelector(".caption");
    if (!textarea) return;
    textarea.focus();
    textarea.setSelectionRange(textarea.value.length, textarea.value.length);
  },
  r: () => { ui.offset = 0; loadGallery(0); },
};

document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.target.closest && event.target.closest("textarea, input, select")) return;  // typing: the letters are text
  const action = KEYS[event.key];
  if (!action || (event.repeat && event.key !== "j" && event.key !== "k")) return;  // a held key moves, never re-acts
  event.preventDefault();
  action();
});

async function act(card, type, payload) {
  try {
    const detail = await send(type, payload);
    if (detail.image) fillCard(card, detail.image, true);
  } catch (error) { /* toast shown */ }
}

async function captionNow(ids) {
  try {
    await send("caption_generate", { images: ids.slice(0, 32) });
    toast(ui.status && ui.status.mode === "training" && ui.status.state === "running"
      ? "queued: captioned between the next optimizer steps" : "queued");
  } catch (error) { /* toast shown */ }
}

// ---------------------------------------------------------------- misc

let toastTimer = null;
function toast(text, isError) {
  const el = $("toast");
  el.textContent = text;
  el.className = isError ? "error" : "";
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { el.hidden = true; }, isError ? 6000 : 2500);
}

function debounce(fn, ms) {
  let timer = null;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

$("view").addEventListener("change", () => { ui.view = $("view").value; ui.viewChosen = true; ui.offset = 0; loadGallery(0); });
$("refresh-queue").addEventListener("click", () => KEYS.r());
$("search").addEventListener("input", debounce(() => { ui.query = $("search").value; ui.offset = 0; loadGallery(0); }, 250));
$("prev").addEventListener("click", () => { ui.offset = Math.max(0, ui.offset - PAGE_SIZE); loadGallery(0); });
$("next").addEventListener("click", () => { ui.offset += PAGE_SIZE; loadGallery(0); });
$("caption-shown").addEventListener("click", () => captionNow([...ui.cards.keys()]));
$("pause").addEventListener("click", () => send(ui.status && ui.status.pause_requested ? "resume" : "pause", {}).catch(() => {}));
$("save").addEventListener("click", () => send("save", {}).then(() => toast("saving at the end of this step…")).catch(() => {}));

// Widths change with the window, and when a scrollbar comes or goes: refit the caption boxes then. The refit
// waits for the next frame, so it never changes layout inside the observer's own callback.
let lastGalleryWidth = 0;
new ResizeObserver((entries) => {
  const width = entries[0].contentRect.width;
  if (width === lastGalleryWidth) return;
  lastGalleryWidth = width;
  requestAnimationFrame(fitAllCaptions);
}).observe($("gallery"));

connect();
