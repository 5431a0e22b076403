// The recserve demo page: a client of the public API and nothing more. Every value shown
// comes from GET /bundle, GET /items, POST /recommend or GET /items/{id}/similar; a failed
// call shows the server's own error text. Text from the server is only ever set as
// textContent, never parsed as HTML.
"use strict";

const state = {
  bundle: null, // GET /bundle
  history: [], // [{item_id, title, ts}], oldest first
  generation: 0, // bumps on every history change: older answers are dropped
};

const $ = (id) => document.getElementById(id);

function element(tag, options = {}, children = []) {
  const node = document.createElement(tag);
  if (options.className) node.className = options.className;
  if (options.text !== undefined) node.textContent = options.text;
  if (options.title) node.title = options.title;
  for (const [key, value] of Object.entries(options.data || {})) node.dataset[key] = value;
  for (const child of children) if (child) node.append(child);
  return node;
}

class ApiError extends Error {}

async function api(method, path, body) {
  const headers = { accept: "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers["x-api-key"] = key;
  if (body !== undefined) headers["content-type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (exc) {
    throw new ApiError(`${method} ${path}: the server cannot be reached (${exc.message})`);
  }
  const text = await response.text();
  let payload = null;
  try {
    payload = text ? JSON.parse(text) : null;
  } catch {
    payload = null;
  }
  if (!response.ok) {
    const detail = payload && payload.detail ? payload.detail : text || response.statusText;
    throw new ApiError(`${method} ${path.split("?")[0]}: ${response.status} ${detail}`);
  }
  return payload;
}

function showError(error) {
  const box = $("error");
  box.textContent = error instanceof Error ? error.message : String(error);
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// ---------------------------------------------------------------- bundle and catalogue

function describeBundle(info) {
  const parts = [`bundle ${info.name}`, `${info.items.toLocaleString()} items`];
  if (info.created_at) parts.push(`exported ${info.created_at.slice(0, 16).replace("T", " ")}`);
  const retrievers = info.retrievers.map((r) => `${r.name}${r.reranks ? " + CTR head" : ""}`);
  // Whether each head reranks by default, and why, is on its column's badge.
  parts.push(`retrievers: ${retrievers.join(", ")}`);
  return parts.join(" · ");
}

async function loadBundle() {
  try {
    state.bundle = await api("GET", "/bundle");
  } catch (error) {
    $("bundle").textContent = "no bundle information";
    showError(error);
    return;
  }
  $("bundle").textContent = describeBundle(state.bundle);
  listCategories(state.bundle.categories || {});
  renderRecommendations();
  search("");
}

// The filter's choices: the catalogue's categories, largest first, as GET /bundle lists them.
function listCategories(categories) {
  const names = Object.keys(categories);
  $("filters").hidden = names.length === 0;
  for (const id of ["include-category", "exclude-category"]) {
    const select = $(id);
    select.replaceChildren(select.options[0]);
    for (const name of names) {
      const option = element("option", { text: `${name} (${categories[name]})` });
      option.value = name;
      select.append(option);
    }
  }
}

// The request's filter, or undefined for none (the service then serves available items).
function currentFilter() {
  const include = $("include-category").value;
  const exclude = $("exclude-category").value;
  if (!include && !exclude) return undefined;
  const filter = {};
  if (include) filter.include_categories = [include];
  if (exclude) filter.exclude_categories = [exclude];
  return filter;
}

let searchTimer = null;
let searchGeneration = 0;

async function search(query) {
  const mine = ++searchGeneration;
  const params = new URLSearchParams({ q: query, limit: "30" });
  try {
    const found = await api("GET", `/items?${params}`);
    if (mine !== searchGeneration) return;
    $("search-status").textContent = query.trim()
      ? `${found.matched.toLocaleString()} matching, ${found.items.length} shown`
      : "most popular items";
    $("search-results").replaceChildren(...found.items.map(catalogueRow));
  } catch (error) {
    if (mine !== searchGeneration) return;
    $("search-status").textContent = "search failed";
    showError(error);
  }
}

function itemLabel(item) {
  return item.title || `item ${item.item_id}`;
}

function catalogueRow(item) {
  const add = element("button", { className: "add", text: "add", title: "add to the history" });
  add.type = "button";
  add.addEventListener("click", () => addToHistory(item));
  const similar = element("button", { className: "similar", text: "similar" });
  similar.type = "button";
  similar.addEventListener("click", () => showSimilar(item));
  const meta = [`id ${item.item_id}`, `${item.popularity} events`];
  if (item.genres && item.genres.length) meta.push(item.genres.join(", "));
  return element("li", { data: { itemId: item.item_id } }, [
    element("span", { className: "title", text: itemLabel(item) }),
    element("span", { className: "muted meta", text: meta.join(" · ") }),
    element("span", { className: "actions" }, [add, similar]),
  ]);
}

// ---------------------------------------------------------------- history

function addToHistory(item) {
  const now = Math.floor(Date.now() / 1000);
  const last = state.history.length ? state.history[state.history.length - 1].ts : 0;
  // Events must not go back in time: two clicks in one second share the second.
  state.history.push({ item_id: item.item_id, title: item.title, ts: Math.max(now, last) });
  historyChanged();
}

function historyChanged() {
  const list = $("history");
  list.replaceChildren(
    ...state.history.map((event, position) => {
      const remove = element("button", { text: "×", title: "remove this event" });
      remove.type = "button";
      remove.addEventListener("click", () => {
        state.history.splice(position, 1);
        historyChanged();
      });
      return element("li", { data: { itemId: event.item_id, ts: String(event.ts) } }, [
        element("span", { text: itemLabel(event) }),
        remove,
      ]);
    }),
  );
  $("history-empty").hidden = state.history.length > 0;
  renderRecommendations();
}

// ---------------------------------------------------------------- result columns

function number(value, digits = 3) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "–";
}

function movement(position, retrievalRank) {
  const change = retrievalRank - position;
  if (change > 0) return element("span", { className: "up", text: `▲${change}` });
  if (change < 0) return element("span", { className: "down", text: `▼${-change}` });
  return element("span", { className: "muted", text: "=" });
}

// A table of result items; ``rerank`` (a recommendation, not a similar-items list) adds
// the head's score and the move it made, or dashes where the answer was not reranked.
function resultTable(items, { rerank, reranked }) {
  const head = element("tr", {}, [
    element("th", { text: "#" }),
    element("th", { text: "item" }),
    element("th", { text: "retrieval", title: "retrieval score (inner product or cosine)" }),
    rerank ? element("th", { text: "rerank", title: "the CTR head's score (logit)" }) : null,
    rerank ? element("th", { text: "move", title: "position change the rerank made" }) : null,
  ]);
  const rows = items.map((item, index) => {
    const position = index + 1;
    const label = element("td", { className: "item" }, [
      element("span", { className: "title", text: itemLabel(item) }),
      element("span", { className: "muted", text: ` ${item.item_id}` }),
    ]);
    label.classList.add("clickable");
    label.title = "add to the history";
    label.addEventListener("click", () => addToHistory(item));
    const cells = [
      element("td", { text: String(position) }),
      label,
      element("td", { className: "num", text: number(item.retrieval_score) }),
    ];
    if (rerank) {
      cells.push(
        element("td", { className: "num", text: reranked ? number(item.score) : "–" }),
        element("td", {}, [
          reranked ? movement(position, item.retrieval_rank) : element("span", { text: "–" }),
        ]),
      );
    }
    return element("tr", { data: { itemId: item.item_id } }, cells);
  });
  return element("table", {}, [element("thead", {}, [head]), element("tbody", {}, rows)]);
}

function column(retriever) {
  const metrics = retriever.test_metrics || {};
  const popularity = retriever.popularity_test_metrics || {};
  const offline =
    metrics["ndcg@10"] !== undefined
      ? `offline NDCG@10 ${number(metrics["ndcg@10"], 4)}` +
        (popularity["ndcg@10"] !== undefined
          ? ` (popularity ${number(popularity["ndcg@10"], 4)})`
          : "")
      : "";
  return element(
    "article",
    { className: "column", data: { encoder: retriever.name, state: "empty" } },
    [
      element("h3", {}, [
        element("span", { text: retriever.name }),
        retriever.reranks
          ? element("span", {
              className: "badge",
              text: `CTR head · rerank ${retriever.rerank_by_default ? "on" : "off"} by default`,
              title: retriever.rerank_reason,
            })
          : null,
      ]),
      element("p", { className: "muted", text: `${retriever.index} · dim ${retriever.dim} · ${offline}` }),
      element("div", { className: "body" }),
    ],
  );
}

function fill(node, status, children) {
  node.dataset.state = status;
  node.querySelector(".body").replaceChildren(...children);
}

function describeAnswer(answer) {
  const facts = [
    `cache ${answer.cache}`,
    answer.reranked ? "reranked" : "retrieval order",
  ];
  if (answer.fallback) facts.push(`fallback: ${answer.fallback}`);
  if (answer.filtered) facts.push(`filter removed ${answer.filtered}`);
  if (answer.unknown_items) facts.push(`${answer.unknown_items} unknown history items`);
  const t = answer.timings_ms;
  const timings = `encode ${number(t.encode, 2)} · retrieve ${number(t.retrieve, 2)} · ` +
    `rerank ${number(t.rerank, 2)} · total ${number(t.total, 2)} ms`;
  return [
    element("p", { className: "facts", text: facts.join(" · ") }),
    element("p", { className: "muted timings", text: timings }),
  ];
}

// What the rerank option asks: undefined leaves "rerank" out of the request, so each
// retriever serves its bundle's default (GET /bundle: rerank_by_default and its reason).
function rerankAsked() {
  const choice = $("rerank").value;
  return choice === "default" ? undefined : choice === "on";
}

function renderRecommendations() {
  if (!state.bundle) return;
  const generation = ++state.generation;
  const filter = currentFilter();
  const columns = state.bundle.retrievers.map(column);
  for (const node of columns) node.dataset.filter = JSON.stringify(filter || {});
  $("recommendations").replaceChildren(...columns);
  if (!state.history.length) return;
  clearError();
  const k = Number.parseInt($("k").value, 10);
  const history = state.history.map(({ item_id, ts }) => ({ item_id, ts }));
  for (const node of columns) {
    const encoder = node.dataset.encoder;
    fill(node, "loading", [element("p", { className: "muted", text: "asking…" })]);
    api("POST", "/recommend", {
      history,
      k: Number.isNaN(k) ? $("k").value : k,
      encoder,
      rerank: rerankAsked(),
      filter,
    }).then(
      (answer) => {
        if (generation !== state.generation) return;
        // The time the rerank's recency features measured to: sent back as "at", the
        // same request ranks the same.
        node.dataset.at = String(answer.at);
        fill(node, "ready", [
          ...describeAnswer(answer),
          resultTable(answer.items, { rerank: true, reranked: answer.reranked }),
        ]);
      },
      (error) => {
        if (generation !== state.generation) return;
        fill(node, "error", [element("p", { className: "error-text", text: error.message })]);
        showError(error);
      },
    );
  }
}

// ---------------------------------------------------------------- similar items

async function showSimilar(item) {
  if (!state.bundle) return;
  $("similar-panel").hidden = false;
  $("similar-title").textContent = `${itemLabel(item)} (${item.item_id})`;
  const columns = state.bundle.retrievers.map(column);
  $("similar").replaceChildren(...columns);
  clearError();
  await Promise.all(
    columns.map(async (node) => {
      const params = new URLSearchParams({ k: "10", encoder: node.dataset.encoder });
      const filter = currentFilter();
      if (filter) params.set("filter", JSON.stringify(filter));
      fill(node, "loading", [element("p", { className: "muted", text: "asking…" })]);
      try {
        const answer = await api(
          "GET",
          `/items/${encodeURIComponent(item.item_id)}/similar?${params}`,
        );
        fill(node, "ready", [resultTable(answer.items, { rerank: false })]);
      } catch (error) {
        fill(node, "error", [element("p", { className: "error-text", text: error.message })]);
        showError(error);
      }
    }),
  );
}

// ---------------------------------------------------------------- wiring

function start() {
  const key = sessionStorage.getItem("recserve-api-key");
  if (key) $("api-key").value = key;
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem("recserve-api-key", $("api-key").value.trim());
    loadBundle();
  });
  $("search").addEventListener("input", (event) => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => search(event.target.value), 200);
  });
  $("k").addEventListener("change", renderRecommendations);
  $("rerank").addEventListener("change", renderRecommendations);
  $("include-category").addEventListener("change", renderRecommendations);
  $("exclude-category").addEventListener("change", renderRecommendations);
  $("clear-history").addEventListener("click", () => {
    state.history = [];
    historyChanged();
  });
  $("close-similar").addEventListener("click", () => {
    $("similar-panel").hidden = true;
  });
  loadBundle();
}

document.addEventListener("DOMContentLoaded", start);
