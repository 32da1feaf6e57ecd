// The transcript page: loads data.json next to the page (same signed query),
// shows speakers, timestamps, search and downloads, and while the meeting is
// live follows the Server-Sent Events stream. No external assets.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const list = $("transcript");
  const search = $("search");
  const count = $("search-count");
  const statusEl = $("status");
  const announce = $("announce");
  const tid = decodeURIComponent(location.pathname.split("/").filter(Boolean).pop());
  const query = location.search;
  const entries = new Map(); // message id -> {entry, li}
  const speakers = new Map(); // speaker id -> {name, cls}
  let origin = null;
  let following = false; // a live stream is open

  function parseTime(iso) {
    const t = Date.parse(iso);
    return Number.isNaN(t) ? null : t;
  }

  function clock(ms) {
    const s = Math.max(0, Math.floor(ms / 1000));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    return [h, m, sec].map((n) => String(n).padStart(2, "0")).join(":");
  }

  function setStatus(text, live) {
    statusEl.textContent = text;
    statusEl.classList.toggle("live", !!live);
  }

  function speakerOf(e) {
    const id = e.speaker_id || e.speaker_name || "unknown";
    let s = speakers.get(id);
    if (!s) {
      s = { name: e.speaker_name || e.speaker_id || "Unknown", cls: "c" + (speakers.size % 8) };
      speakers.set(id, s);
      const li = document.createElement("li");
      li.className = s.cls;
      li.textContent = s.name;
      li.dataset.speaker = id;
      $("speakers").appendChild(li);
    } else if (e.speaker_name && s.name !== e.speaker_name) {
      s.name = e.speaker_name;
      const li = $("speakers").querySelector(`li[data-speaker="${CSS.escape(id)}"]`);
      if (li) li.textContent = s.name;
    }
    return s;
  }

  function highlight(el, text, q) {
    el.textContent = "";
    if (!q) { el.textContent = text; return; }
    const lower = text.toLowerCase();
    let at = 0;
    for (;;) {
      const i = lower.indexOf(q, at);
      if (i < 0) break;
      el.appendChild(document.createTextNode(text.slice(at, i)));
      const mark = document.createElement("mark");
      mark.textContent = text.slice(i, i + q.length);
      el.appendChild(mark);
      at = i + q.length;
    }
    el.appendChild(document.createTextNode(text.slice(at)));
  }

  function render(item) {
    const e = item.entry;
    const s = speakerOf(e);
    const li = item.li || document.createElement("li");
    item.li = li;
    li.textContent = "";
    li.dataset.id = e.message_id;
    li.dataset.start = String(parseTime(e.start_time) ?? 0);
    li.classList.toggle("interim", !!e.is_interim);
    const time = document.createElement("time");
    time.dateTime = e.start_time;
    const start = parseTime(e.start_time);
    time.textContent = origin !== null && start !== null ? clock(start - origin) : "";
    const who = document.createElement("span");
    who.className = "who " + s.cls;
    who.textContent = s.name;
    const text = document.createElement("span");
    text.className = "text";
    highlight(text, e.text, search.value.trim().toLowerCase());
    li.append(time, who, text);
    li.setAttribute("aria-label", `${time.textContent} ${s.name}: ${e.text}`);
    return li;
  }

  function place(li) {
    // keep the list in start-time order; live finals almost always go last
    const start = Number(li.dataset.start);
    let after = list.lastElementChild;
    while (after && after !== li && Number(after.dataset.start) > start) {
      after = after.previousElementSibling;
    }
    if (after === li) return;
    if (after) after.after(li); else list.prepend(li);
  }

  function upsert(e) {
    if (!e.text && !e.is_interim) return;
    const known = entries.get(e.message_id);
    if (known && !known.entry.is_interim && e.is_interim) return; // a late interim
    if (known && !known.entry.is_interim && !e.is_interim && known.entry.text === e.text) {
      return; // replayed
    }
    const wasFinal = !!known && !known.entry.is_interim;
    const item = known || { entry: e, li: null };
    item.entry = e;
    entries.set(e.message_id, item);
    const atBottom = window.innerHeight + window.scrollY >= document.body.scrollHeight - 40;
    place(render(item));
    applySearch();
    $("empty").hidden = entries.size > 0;
    if (following && !e.is_interim && !wasFinal) {
      announce.textContent = `${speakerOf(e).name}: ${e.text}`;
    }
    if (following && atBottom && !search.value) item.li.scrollIntoView({ block: "end" });
  }

  function applySearch() {
    const q = search.value.trim().toLowerCase();
    let shown = 0;
    for (const item of entries.values()) {
      const e = item.entry;
      const hit = !q || e.text.toLowerCase().includes(q) || speakerOf(e).name.toLowerCase().includes(q);
      item.li.hidden = !hit;
      if (hit) shown += 1;
      highlight(item.li.querySelector(".text"), e.text, q);
    }
    count.textContent = q
      ? `${shown} of ${entries.size} ${entries.size === 1 ? "entry matches" : "entries match"}`
      : "";
  }

  function showMeta(data) {
    const meta = data.meta;
    origin = parseTime(meta.started_at);
    const date = $("date");
    date.dateTime = meta.started_at;
    date.textContent = origin !== null
      ? new Date(origin).toLocaleString(undefined, { dateStyle: "full", timeStyle: "short" })
      : "";
    if (data.live) setStatus("Live: the transcript grows as people speak", true);
    else if (meta.complete) setStatus("Complete", false);
    else setStatus("Incomplete: the recording was interrupted", false);
    const ul = $("downloads");
    ul.textContent = "";
    for (const d of data.downloads) {
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.href = d.href;
      a.setAttribute("download", `${meta.id}.${d.format}`);
      a.textContent = d.format.toUpperCase();
      a.setAttribute("aria-label", `Download as ${d.label} (.${d.format})`);
      a.dataset.format = d.format;
      li.appendChild(a);
      ul.appendChild(li);
    }
  }

  function follow(url) {
    const es = new EventSource(url);
    following = true;
    es.addEventListener("caption", (m) => upsert(JSON.parse(m.data)));
    es.addEventListener("ended", () => {
      es.close();
      following = false;
      load(false);
    });
    es.addEventListener("open", () => setStatus("Live: the transcript grows as people speak", true));
    es.addEventListener("error", () => {
      if (es.readyState !== EventSource.CLOSED) setStatus("Live: reconnecting…", true);
    });
  }

  async function load(live) {
    let resp;
    try {
      resp = await fetch(`${encodeURIComponent(tid)}/data.json${query}`, { cache: "no-store" });
    } catch (err) {
      setStatus("Could not load the transcript: the server did not answer", false);
      return;
    }
    if (!resp.ok) {
      setStatus(resp.status === 410 ? "This link has expired" : "Could not load the transcript", false);
      return;
    }
    const data = await resp.json();
    showMeta(data);
    for (const e of data.entries) upsert(Object.assign({ is_interim: false }, e));
    // interims of a meeting that ended never get their final
    for (const [id, item] of entries) {
      if (item.entry.is_interim && !data.live) { item.li.remove(); entries.delete(id); }
    }
    $("empty").hidden = entries.size > 0;
    if (live && data.live) follow(data.events);
  }

  search.addEventListener("input", applySearch);
  $("search-form").addEventListener("submit", (ev) => ev.preventDefault());
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "/" && document.activeElement !== search) {
      ev.preventDefault();
      search.focus();
    } else if (ev.key === "Escape" && document.activeElement === search) {
      search.value = "";
      applySearch();
    }
  });
  load(true);
})();
