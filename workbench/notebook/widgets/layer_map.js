// Per-layer map: one tile per layer, coloured by sensitivity (metric drop), sparsity, or the share of a layer a
// structured pruning kept; a click (or Space/Enter on the focused tile) excludes the layer from pruning and
// quantization, or includes it again; "undo" (or Ctrl+Z in the map) takes the last change back. The choice syncs
// back to Python as `excluded`. Tiles use translucent colours over the theme's background and the theme's text
// colour, so the map reads in JupyterLab's light and dark themes.
function colour(value, mode) {
  if (value === null || value === undefined || Number.isNaN(value)) return "transparent";
  if (mode === "sensitivity") {
    const t = Math.max(0, Math.min(1, -value / 0.2)); // a drop of 20 points or more is full red
    return `rgba(230, 60, 40, ${(0.08 + 0.62 * t).toFixed(3)})`;
  }
  const t = Math.max(0, Math.min(1, value)); // a share (sparsity, kept, weights) 0..1
  return `rgba(40, 110, 230, ${(0.08 + 0.62 * t).toFixed(3)})`;
}

function label(layer, mode) {
  if (layer.label) return layer.label;
  const value = layer.value;
  if (value === null || value === undefined) return "";
  return mode === "sensitivity" ? `Δ ${value.toPrecision(2)}` : `${(100 * value).toFixed(0)}%`;
}

function render({ model, el }) {
  const root = document.createElement("div");
  root.className = "wb-layer-map";
  el.appendChild(root);
  const history = []; // earlier `excluded` lists, for undo

  function set(next) {
    history.push([...model.get("excluded")]);
    model.set("excluded", next);
    model.save_changes();
  }

  function toggle(name) {
    const now = new Set(model.get("excluded"));
    if (now.has(name)) now.delete(name); else now.add(name);
    set([...now]);
  }

  function undo() {
    if (!history.length) return;
    model.set("excluded", history.pop());
    model.save_changes();
  }

  function draw() {
    const mode = model.get("colour_by");
    const excluded = new Set(model.get("excluded"));
    const focused = root.contains(document.activeElement) ? document.activeElement.dataset.layer : null;
    root.innerHTML = "";
    const head = document.createElement("div");
    head.className = "wb-layer-map-title";
    head.textContent = `${model.get("title")} (colour: ${mode}; click a layer, or Space on it, to leave it out)`;
    const back = document.createElement("button");
    back.className = "wb-undo";
    back.textContent = "undo";
    back.title = "take the last change back (Ctrl+Z)";
    back.disabled = history.length === 0;
    back.addEventListener("click", undo);
    head.appendChild(back);
    root.appendChild(head);
    const grid = document.createElement("div");
    grid.className = "wb-layer-grid";
    grid.setAttribute("role", "group");
    grid.setAttribute("aria-label", `${model.get("title")}: layers`);
    for (const layer of model.get("layers")) {
      const out = excluded.has(layer.name);
      const cell = document.createElement("button");
      cell.className = "wb-layer" + (out ? " wb-excluded" : "");
      cell.dataset.layer = layer.name;
      cell.setAttribute("aria-pressed", String(out));
      cell.style.background = out ? "rgba(128, 128, 128, 0.35)" : colour(layer.value, mode);
      cell.title = `${layer.name} (${layer.type}), ${layer.params.toLocaleString()} weights` +
        (layer.detail ? `, ${layer.detail}` : "") + (out ? " — excluded" : "");
      for (const [cls, text] of [["wb-name", layer.name], ["wb-type", layer.type],
                                 ["wb-value", out ? "excluded" : label(layer, mode)]]) {
        const span = document.createElement("span");
        span.className = cls;
        span.textContent = text;
        cell.appendChild(span);
      }
      cell.addEventListener("click", () => toggle(layer.name)); // Space and Enter click a focused button
      grid.appendChild(cell);
    }
    root.appendChild(grid);
    if (focused !== null) {
      const again = [...grid.children].find(c => c.dataset.layer === focused);
      if (again) again.focus();
    }
  }

  root.addEventListener("keydown", (event) => {
    if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "z") {
      event.preventDefault();
      event.stopPropagation(); // JupyterLab's own undo would act on the notebook
      undo();
    }
  });
  model.on("change:layers", draw);
  model.on("change:excluded", draw);
  model.on("change:colour_by", draw);
  draw();
}

export default { render };
