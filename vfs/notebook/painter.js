// The painter both front ends use: the notebook's SearchWidget and the dashboard's canvas (ui/canvas.py).
// Free-hand strokes and rectangles on a <canvas>, with undo, redo and clear (buttons and keys). The shapes
// are plain JSON in canvas pixels, oldest first, so Python can store them and a new canvas can redraw
// them; the canvas's alpha is the paint. Neither front end can import a file beside it, so each is
// served after this one.

const PAINT = "rgb(255, 96, 0)"; // opaque on the canvas; the canvas is shown half transparent

const MASKS = new WeakMap(); // a mask shape → its pixels, decoded once (a redraw follows every stroke)

// A region loaded from a mask file (ui/canvas.py mask_shape): rows of bits, high bit first, in base64.
function maskCanvas(shape) {
  if (!MASKS.has(shape)) {
    const [width, height] = shape.size;
    const bytes = Uint8Array.from(atob(shape.bits), (c) => c.charCodeAt(0));
    const rowBytes = Math.ceil(width / 8);
    const image = new ImageData(width, height);
    const pixel = Uint8ClampedArray.of(...PAINT.match(/\d+/g).map(Number), 255);
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < width; x++) {
        if (bytes[y * rowBytes + (x >> 3)] & (0x80 >> (x & 7))) image.data.set(pixel, 4 * (y * width + x));
      }
    }
    const canvas = document.createElement("canvas");
    Object.assign(canvas, { width, height });
    canvas.getContext("2d").putImageData(image, 0, 0);
    MASKS.set(shape, canvas);
  }
  return MASKS.get(shape);
}

function drawShape(ctx, shape) {
  if (shape.kind === "mask") {
    ctx.drawImage(maskCanvas(shape), 0, 0); // 1:1 at whole pixels: pixel for pixel
    return;
  }
  if (shape.kind === "rect") {
    const [x0, y0, x1, y1] = shape.box;
    ctx.fillRect(Math.min(x0, x1), Math.min(y0, y1), Math.abs(x1 - x0), Math.abs(y1 - y0));
    return;
  }
  const points = shape.points;
  ctx.lineWidth = shape.size;
  if (points.length === 1) {
    ctx.beginPath();
    ctx.arc(points[0][0], points[0][1], shape.size / 2, 0, 2 * Math.PI);
    ctx.fill();
    return;
  }
  ctx.beginPath();
  ctx.moveTo(points[0][0], points[0][1]);
  for (const [x, y] of points.slice(1)) ctx.lineTo(x, y);
  ctx.stroke();
}

const HISTORY = [
  ["Undo", "Remove the last change (Ctrl+Z)"],
  ["Redo", "Bring back the last change undone (Ctrl+Shift+Z)"],
  ["Clear", "Remove every stroke"],
];

// The key a keydown means for undo and redo: its letter, or where the key sits on a non-Latin layout.
function shortcut(event) {
  if (!(event.ctrlKey || event.metaKey) || event.altKey || event.repeat) return null;
  const letter = /^[a-z]$/i.test(event.key) ? event.key.toLowerCase() : { KeyZ: "z", KeyY: "y" }[event.code];
  if (letter === "z") return event.shiftKey ? "redo" : "undo";
  return letter === "y" ? "redo" : null;
}

// The pointer over the canvas: for the brush, a ring of the brush's size on screen (black and white, so it
// shows on any image); else, or where a browser would refuse a cursor that large, a crosshair.
function cursorFor(tool, diameter) {
  const d = Math.round(diameter);
  if (tool === "rectangle" || d + 2 > 128 || d < 3) return "crosshair";
  const r = d / 2;
  const svg =
    `<svg xmlns="http://www.w3.org/2000/svg" width="${d + 2}" height="${d + 2}">` +
    `<circle cx="${r + 1}" cy="${r + 1}" r="${r}" fill="none" stroke="black"/>` +
    `<circle cx="${r + 1}" cy="${r + 1}" r="${r - 1}" fill="none" stroke="white"/></svg>`;
  return `url('data:image/svg+xml,${encodeURIComponent(svg)}') ${Math.round(r + 1)} ${Math.round(r + 1)}, crosshair`;
}

// Keyboard painting, by the feature grid's cells: the pixels cells first..last of `cells` span over
// `pixels`, inset to whole pixels — painted, the cells weigh what share of them that is on the grid
// (vfs.masks.grid_mask: 0.93–0.97 for 7×7 to 14×14 over 320 px, 0.77–0.93 for 28×28) and their
// neighbours nothing, so the region's window is exactly the cells covered.
function cellSpan(first, last, cells, pixels) {
  return [Math.ceil((first * pixels) / cells), Math.floor(((last + 1) * pixels) / cells)];
}

const ARROWS = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };

const KEYS_HELP =
  "Region to search for. Paint with the mouse, a pen or a finger; or with the keys: the arrows move a " +
  "one-cell cursor over the feature grid's cells (a stretched one becomes one cell again as it moves), " +
  "Shift with the arrows stretches it, Space or Enter paints what it covers, Escape shrinks it to one " +
  "cell; Ctrl+Z undoes, Ctrl+Shift+Z redoes.";

// `settings()` gives {tool: "brush" | "rectangle", brush: diameter in canvas pixels, grid: [rows, columns]};
// `changed(shapes)` runs after a finished stroke, an undo, a redo or a clear — not after `set`.
// Undo, Redo and Clear buttons (class `buttonClass`) go into `bar`, each enabled only when it would change
// the drawing; while the focus is inside `keys` (a stroke or a button gives it to the canvas), Ctrl+Z
// undoes and Ctrl+Shift+Z or Ctrl+Y redoes (⌘ on a Mac). Clear is undone like any other change. The
// canvas is in the tab order: focused from the keyboard, it shows a cell cursor (KEYS_HELP), said aloud.
function createPainter(canvas, { settings, changed, bar, keys, buttonClass = "" }) {
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  let shapes = [];
  let past = []; // the drawings before each change, oldest first: what undo goes back to
  let future = []; // the drawings undone, last undone last: what redo brings back
  let current = null; // the stroke being drawn, by the pointer `pointer`
  let pointer = null;
  canvas.tabIndex = 0;
  canvas.setAttribute("role", "application"); // its own keys: a screen reader passes them through
  canvas.setAttribute("aria-label", KEYS_HELP);
  const cellCursor = document.createElement("div");
  cellCursor.className = "vfs-cell-cursor";
  cellCursor.hidden = true;
  const said = document.createElement("div"); // what the cursor covers and what was painted, read aloud
  said.className = "vfs-said";
  said.setAttribute("aria-live", "polite");
  canvas.after(cellCursor, said);
  let anchor = null; // [row, column] where Shift-stretching began; `at` is the cursor's own cell
  let at = null;
  let cursorGrid = null; // the grid `at` and `anchor` are on (a canvas may change caches, not queries)
  let focusing = false; // the painter's own focus calls (after a stroke, a button): no cell cursor
  function focusCanvas() {
    focusing = true; // focus events run within focus(): the flag is read there
    canvas.focus({ preventScroll: true });
    focusing = false;
  }

  const buttons = Object.fromEntries(
    HISTORY.map(([name, title]) => {
      const node = document.createElement("button");
      Object.assign(node, { type: "button", className: buttonClass, textContent: name, title });
      node.addEventListener("click", () => {
        ({ Undo: undo, Redo: redo, Clear: clear })[name]();
        if (node.disabled) focusCanvas(); // a button that disables itself drops the focus: the keys go on
      });
      bar.appendChild(node);
      return [name, node];
    }),
  );
  keys.addEventListener("keydown", (event) => {
    const action = shortcut(event);
    if (!action || event.target.closest("input, textarea, select, [contenteditable]")) return; // their own undo
    event.preventDefault();
    (action === "undo" ? undo : redo)();
  });

  function redraw() {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    Object.assign(ctx, { fillStyle: PAINT, strokeStyle: PAINT, lineCap: "round", lineJoin: "round" });
    for (const shape of current ? [...shapes, current] : shapes) drawShape(ctx, shape);
  }

  function show(next, history) {
    shapes = next;
    [past, future] = history;
    redraw();
    buttons.Undo.disabled = !past.length;
    buttons.Redo.disabled = !future.length;
    buttons.Clear.disabled = !shapes.length;
  }
  function commit(next) {
    show(next, [[...past, shapes], []]);
    changed(shapes);
  }
  function undo() {
    if (!past.length) return;
    show(past[past.length - 1], [past.slice(0, -1), [...future, shapes]]);
    changed(shapes);
  }
  function redo() {
    if (!future.length) return;
    show(future[future.length - 1], [[...past, shapes], future.slice(0, -1)]);
    changed(shapes);
  }
  function clear() {
    if (shapes.length) commit([]);
  }

  function point(event) {
    const box = canvas.getBoundingClientRect();
    const round = (v) => Math.round(v * 10) / 10; // a tenth of a pixel: shorter JSON, the same paint
    return [
      round(((event.clientX - box.left) / box.width) * canvas.width),
      round(((event.clientY - box.top) / box.height) * canvas.height),
    ];
  }

  canvas.addEventListener("pointerdown", (event) => {
    if (current || !event.isPrimary || event.button !== 0) return; // one stroke at a time: no second finger
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    cellCursor.hidden = true; // a pointer's user: the keys paint again once Tab brings the focus back
    focusCanvas();
    pointer = event.pointerId;
    const p = point(event);
    const { tool, brush } = settings();
    current = tool === "rectangle" ? { kind: "rect", box: [...p, ...p] } : { kind: "brush", size: brush, points: [p] };
    redraw();
  });
  let cursor = "";
  function showCursor() {
    const { tool, brush } = settings();
    const next = cursorFor(tool, (brush * canvas.getBoundingClientRect().width) / canvas.width);
    if (next !== cursor) canvas.style.cursor = cursor = next;
  }
  canvas.addEventListener("pointerenter", showCursor);
  canvas.addEventListener("pointermove", (event) => {
    if (!current) showCursor(); // the tool or the brush may have changed since the pointer came in
    if (!current || event.pointerId !== pointer) return;
    const p = point(event);
    if (current.kind === "rect") current.box = [current.box[0], current.box[1], ...p];
    else current.points.push(p);
    redraw();
  });
  canvas.addEventListener("pointerup", (event) => {
    if (!current || event.pointerId !== pointer) return;
    const shape = current;
    current = null;
    const [x0, y0, x1, y1] = shape.box || [];
    if (shape.kind !== "rect" || (x0 !== x1 && y0 !== y1)) commit([...shapes, shape]);
    else redraw(); // a click with the rectangle tool paints nothing
  });
  canvas.addEventListener("pointercancel", (event) => {
    if (!current || event.pointerId !== pointer) return;
    current = null; // the system took the pointer (a gesture, palm rejection): the stroke was not meant
    redraw();
  });

  // --- the keys ------------------------------------------------------------------------------------------
  function covered() {
    const [r0, r1] = [Math.min(anchor[0], at[0]), Math.max(anchor[0], at[0])];
    const [c0, c1] = [Math.min(anchor[1], at[1]), Math.max(anchor[1], at[1])];
    return { r0, r1, c0, c1 };
  }
  function describe({ r0, r1, c0, c1 }) {
    const [rows, columns] = settings().grid;
    const span = (a, b, n) => (a === b ? `${a + 1}` : `${a + 1} to ${b + 1}`) + ` of ${n}`;
    return `row ${span(r0, r1, rows)}, column ${span(c0, c1, columns)}`;
  }
  function coveredBox() {
    const [rows, columns] = settings().grid;
    const { r0, r1, c0, c1 } = covered();
    const [x0, x1] = cellSpan(c0, c1, columns, canvas.width);
    const [y0, y1] = cellSpan(r0, r1, rows, canvas.height);
    return [x0, y0, x1, y1];
  }
  function showCellCursor() {
    const [x0, y0, x1, y1] = coveredBox();
    const percent = (v, total) => `${(100 * v) / total}%`;
    Object.assign(cellCursor.style, {
      left: percent(x0, canvas.width),
      top: percent(y0, canvas.height),
      width: percent(x1 - x0, canvas.width),
      height: percent(y1 - y0, canvas.height),
    });
    cellCursor.hidden = false;
    said.textContent = describe(covered());
  }
  // Keys paint only once Tab (or Shift+Tab) has brought the focus: after a stroke or a button the focus
  // stays for Ctrl+Z, and Space and the arrows keep scrolling the page.
  canvas.addEventListener("focus", () => {
    const grid = settings().grid;
    if (focusing || !grid) return;
    if (at === null || String(grid) !== String(cursorGrid)) {
      at = anchor = [Math.floor(grid[0] / 2), Math.floor(grid[1] / 2)]; // the middle cell
      cursorGrid = grid;
    }
    showCellCursor();
  });
  canvas.addEventListener("blur", () => {
    cellCursor.hidden = true;
  });
  canvas.addEventListener("keydown", (event) => {
    const grid = settings().grid;
    if (cellCursor.hidden || !grid || event.ctrlKey || event.metaKey || event.altKey) return;
    const move = ARROWS[event.key];
    if (move) {
      const step = (v, d, n) => Math.min(n - 1, Math.max(0, v + d));
      at = [step(at[0], move[0], grid[0]), step(at[1], move[1], grid[1])];
      if (!event.shiftKey) anchor = at;
    } else if (event.key === "Escape") {
      anchor = at;
    } else if (event.key === " " || event.key === "Enter") {
      event.preventDefault();
      const box = coveredBox();
      const last = shapes[shapes.length - 1];
      if (event.repeat || (last && last.kind === "rect" && String(last.box) === String(box))) return; // painted
      commit([...shapes, { kind: "rect", box }]);
      said.textContent = `painted ${describe(covered())}`;
      return;
    } else {
      return;
    }
    event.preventDefault(); // the arrows would scroll the page
    showCellCursor();
  });

  show([], [[], []]);
  return {
    get shapes() {
      return shapes;
    },
    // `undoTo`: the drawing an Undo goes back to (the app's canvas, opened on a loaded mask, over the
    // drawing the mask replaced); none by default.
    set(next, undoTo = null) {
      current = null;
      show(next.slice(), [undoTo ? [undoTo] : [], []]);
    },
    // A drawing changed elsewhere (another view of the same widget, or Python), taken as a change of
    // this view's own: Undo here goes back to what this view showed before it (after `set` it had no
    // history left, and its Undo went grey while the other view's stroke could be undone there only).
    adopt(next) {
      if (JSON.stringify(next) === JSON.stringify(shapes)) return;
      current = null;
      show(next.slice(), [[...past, shapes], []]);
    },
    redraw,
    alpha() {
      const rgba = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
      const alpha = new Uint8Array(canvas.width * canvas.height);
      for (let i = 0; i < alpha.length; i++) alpha[i] = rgba[4 * i + 3];
      return alpha;
    },
  };
}
