"""The search page `alignsearch serve` shows at `/`: one self-contained HTML document (inline CSS
and JavaScript, no build step, no CDN). It calls the service's own POST /search (as
`"source": "page"`) and /health, and loads ad images from /image. The page holds no data:
with an API key set it asks for the key when the service answers 401, and sends it with
every call.

What a result shows: its image and title (a link: opening the ad sends POST /click
{request_id, ad_id}, with fetch keepalive so it is sent even as the page is left), its first
visual words (`words_shown`, the ones a person judges; matched ones highlighted), and, when
it stands for ads with the same image (`duplicates`), a discreet note. Hovering or focusing
a word outlines the part of the image it came from (`word_regions`, fractions of the image,
placed on the image's own rectangle inside its letterboxed square).

`CONTENT_SECURITY_POLICY` is served with it: its own inline style and script (by hash) and
nothing else, requests to the service only, no framing."""

import base64
import hashlib

STYLE = """
  body { font-family: system-ui, sans-serif; margin: 0; background: #f6f7f9; color: #1d2330; }
  header { background: #1d2330; color: #fff; padding: 14px 24px; display: flex; align-items: baseline; gap: 24px; }
  header h1 { font-size: 20px; margin: 0; }
  #versions { font-size: 13px; opacity: .85; }
  main { max-width: 1000px; margin: 0 auto; padding: 20px 24px; }
  form { display: flex; gap: 8px; margin-bottom: 16px; }
  [hidden] { display: none !important; }
  #q, #key { flex: 1; font-size: 17px; padding: 9px 12px; border: 1px solid #b8bfcc; border-radius: 6px; }
  button { font-size: 16px; padding: 9px 18px; border: 0; border-radius: 6px; background: #2f6fde; color: #fff; }
  #status { font-size: 13px; color: #5b6475; margin-bottom: 12px; min-height: 1em; }
  ol { list-style: none; padding: 0; margin: 0; display: grid; gap: 10px; }
  li.hit { display: flex; gap: 14px; background: #fff; border-radius: 8px; padding: 10px; box-shadow: 0 1px 2px #0002; }
  .thumb { position: relative; display: block; width: 96px; height: 96px; flex: none; background: #fff;
           border: 1px solid #e3e6eb; }
  .thumb img { display: block; width: 96px; height: 96px; object-fit: contain; }
  .region { position: absolute; box-sizing: border-box; border: 2px solid #e8590c; box-shadow: 0 0 0 1px #fff;
            pointer-events: none; }
  a.open { color: inherit; text-decoration: none; }
  a.open:hover .title, a.open:focus .title { text-decoration: underline; }
  .rank { font-weight: 600; color: #5b6475; width: 2em; }
  .title { font-size: 16px; font-weight: 600; }
  .meta { font-size: 12px; color: #5b6475; margin: 2px 0 6px; }
  .word { display: inline-block; font-size: 12px; padding: 1px 7px; margin: 2px 3px 0 0; border-radius: 10px;
          background: #e9ecf1; color: #39414f; }
  .word.matched { background: #ffd85c; color: #1d2330; font-weight: 600; }
  .word.has-region { cursor: default; text-decoration: underline dotted #8a92a3; }
  .word:focus, .word.active { outline: 2px solid #e8590c; outline-offset: 1px; }
  .dups { font-size: 11px; color: #8a92a3; margin-top: 4px; }
  .error { color: #b3261e; }
"""

SCRIPT = """
const $ = (id) => document.getElementById(id);
// With ALIGNSEARCH_API_KEY set, every call but this page needs the key: asked for on a 401,
// kept for this tab only, sent as X-API-Key (images too: fetched, then shown as blobs).
const KEY = "alignsearch-api-key";
let lastQuery = "";
let imageUrls = [];
function api(path, options) {
  const key = sessionStorage.getItem(KEY);
  const headers = Object.assign({}, (options && options.headers) || {}, key ? {"X-API-Key": key} : {});
  return fetch(path, Object.assign({}, options || {}, {headers: headers}));
}
// A person opened an ad: tell the service which one, and which search showed it. keepalive
// lets the request finish when opening the ad hides or leaves the page; it sends the key
// header, which navigator.sendBeacon could not.
function sendClick(requestId, adId) {
  if (!requestId) return;
  api("/click", {method: "POST", keepalive: true, headers: {"content-type": "application/json"},
                 body: JSON.stringify({request_id: requestId, ad_id: adId})}).catch(() => {});
}
function say(text, cls) {
  $("status").textContent = text;
  $("status").className = cls || "";
}
function askForKey() {
  $("keyform").hidden = false;
  $("key").focus();
  say("This service needs its API key.", "error");
}
function versions(model, catalogue, uri) {
  $("versions").textContent = "model " + (model ? "v" + model : "?") + " \\u00b7 catalogue " + (catalogue || "?") +
    (uri ? " \\u00b7 " + uri : "");
}
function health() {
  api("/health").then(async (r) => {
    if (r.status === 401) return askForKey();
    const h = await r.json();
    versions(h.version, h.catalogue_version, h.model_uri);
  }).catch(() => { $("versions").textContent = "service not ready"; });
}
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
async function showImage(img, adId, links) {
  const r = await api("/image?ad_id=" + encodeURIComponent(adId));
  if (!r.ok) return;
  const url = URL.createObjectURL(await r.blob());
  imageUrls.push(url);
  img.src = url;
  for (const a of links) a.href = url;  // the ad opens without asking for the key again
}
// Outline `box` ([x0, y0, x1, y1], fractions of the image) on the displayed image. The image is
// letterboxed in its square (object-fit: contain), so the box goes on the image's own
// rectangle inside the square, scaled to the size it is displayed at.
function outline(thumb, img, box) {
  const region = thumb.querySelector(".region");
  const nw = img.naturalWidth, nh = img.naturalHeight, w = img.clientWidth, h = img.clientHeight;
  if (!box || !nw || !nh || !w || !h) { region.hidden = true; return; }
  const scale = Math.min(w / nw, h / nh);
  const dw = nw * scale, dh = nh * scale;
  const left = img.offsetLeft + (w - dw) / 2, top = img.offsetTop + (h - dh) / 2;
  region.style.left = (left + box[0] * dw) + "px";
  region.style.top = (top + box[1] * dh) + "px";
  region.style.width = ((box[2] - box[0]) * dw) + "px";
  region.style.height = ((box[3] - box[1]) * dh) + "px";
  region.hidden = false;
}
function wordChips(hit, thumb, img) {
  const words = el("div", "words");
  const matched = new Set(hit.matched_words);
  const regions = hit.word_regions || {};
  const shown = hit.words_shown && hit.words_shown.length ? hit.words_shown : hit.visual_words;
  for (const w of shown) {
    const chip = el("span", matched.has(w) ? "word matched" : "word", w);
    const box = regions[w];
    if (box) {
      chip.classList.add("has-region");
      chip.tabIndex = 0;
      chip.title = "outlines the part of the image this word came from";
      const on = () => { chip.classList.add("active"); outline(thumb, img, box); };
      const off = () => { chip.classList.remove("active"); outline(thumb, img, null); };
      chip.addEventListener("mouseenter", on);
      chip.addEventListener("focus", on);
      chip.addEventListener("mouseleave", off);
      chip.addEventListener("blur", off);
    }
    words.append(chip);
  }
  return words;
}
// The ad's image and its title open it (the image, in a new tab) and report the click.
function opener(hit, requestId, cls) {
  const a = el("a", cls);
  a.href = "/image?ad_id=" + encodeURIComponent(hit.ad_id);
  a.target = "_blank";
  a.rel = "noopener";
  a.addEventListener("click", () => sendClick(requestId, hit.ad_id));
  a.addEventListener("auxclick", (e) => { if (e.button === 1) sendClick(requestId, hit.ad_id); });
  return a;
}
async function search(q) {
  lastQuery = q;
  say("searching\\u2026");
  const r = await api("/search", {method: "POST", headers: {"content-type": "application/json"},
                                  body: JSON.stringify({query: q, k: 10, source: "page"})});
  if (r.status === 401) return askForKey();
  const body = await r.json();
  if (!r.ok) return say("error " + r.status + ": " + JSON.stringify(body.detail), "error");
  const requestId = body.request_id || r.headers.get("X-Request-ID");
  versions(body.model_version, body.catalogue_version, body.model_uri);
  say(body.results.length + " ads in " + body.took_ms + " ms");
  imageUrls.forEach((url) => URL.revokeObjectURL(url));
  imageUrls = [];
  const list = $("results");
  list.replaceChildren();
  for (const hit of body.results) {
    const li = el("li", "hit");
    li.dataset.adId = hit.ad_id;
    li.append(el("span", "rank", hit.rank));
    const thumb = opener(hit, requestId, "open thumb");
    const img = el("img");
    img.alt = hit.title || hit.ad_id;
    const region = el("div", "region");
    region.hidden = true;
    thumb.append(img, region);
    li.append(thumb);
    const text = el("div");
    const title = opener(hit, requestId, "open");
    title.append(el("div", "title", hit.title || "(no title)"));
    text.append(title);
    showImage(img, hit.ad_id, [thumb, title]).catch(() => {});
    text.append(el("div", "meta", hit.ad_id + " \\u00b7 score " + hit.score.toFixed(3)));
    text.append(wordChips(hit, thumb, img));
    const dups = hit.duplicates || [];
    if (dups.length) {
      const note = el("div", "dups", "same image as " + dups.length + " other ad" + (dups.length > 1 ? "s" : ""));
      note.title = dups.join(", ");
      text.append(note);
    }
    li.append(text);
    list.append(li);
  }
}
function run(q) {
  search(q).catch((err) => say(String(err), "error"));
}
$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const q = $("q").value.trim();
  if (q) run(q);
});
$("keyform").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY, $("key").value.trim());
  $("key").value = "";
  $("keyform").hidden = true;
  say("");
  health();
  if (lastQuery) run(lastQuery);
});
health();
"""

PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>alignsearch</title>
<style>{STYLE}</style>
</head>
<body>
<header><h1>alignsearch</h1><span id="versions">loading&hellip;</span></header>
<main>
  <form id="keyform" hidden><input id="key" type="password" placeholder="API key (ALIGNSEARCH_API_KEY)"
         autocomplete="off"><button type="submit" id="usekey">Use key</button></form>
  <form id="form"><input id="q" name="q" placeholder="Search ads, e.g. christmas tree" autofocus
         autocomplete="off" maxlength="256"><button type="submit" id="go">Search</button></form>
  <div id="status"></div>
  <ol id="results"></ol>
</main>
<script>{SCRIPT}</script>
</body>
</html>
"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


CONTENT_SECURITY_POLICY = (f"default-src 'none'; script-src {_sha256(SCRIPT)}; style-src {_sha256(STYLE)}; "
                           "img-src 'self' blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                           "frame-ancestors 'none'")
