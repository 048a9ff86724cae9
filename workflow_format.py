"""ComfyUI workflow formats: the UI ("save") format to the API (`/prompt`) format, and checks on UI workflows.

Pure Python, no ComfyUI: node classes are anything with the classic `INPUT_TYPES()` / `RETURN_TYPES` interface
(our `NODE_CLASS_MAPPINGS`, plus the spec-only stand-ins for the few stock nodes in `STOCK_NODES`).

The rules follow what ComfyUI's frontend does when it saves a graph and when it exports it for the API:
- A UI node stores its widget values by position (`widgets_values`), one per widget, in the order of the node's
  widget inputs in `INPUT_TYPES` (required, then optional). An input is a widget when its type is a combo list or
  INT / FLOAT / STRING / BOOLEAN / COMBO and it is not `forceInput`; other inputs are sockets.
- The frontend adds widgets of its own that occupy a position but never reach the API: `control_after_generate`
  after an INT widget named `seed` / `noise_seed` (or one declaring `control_after_generate`), and the preview and
  upload widgets of `audio_upload` / `image_upload` combos.
- A widget input connected by a link keeps its stored value in place, but the API input is the link.
- Note / MarkdownNote (and other frontend-only nodes) and muted nodes (mode 2) are dropped; a bypassed node (mode 4)
  disappears and its consumers are wired to its input of the same type (the input at the same slot first).
- API format: `{"<node id>": {"inputs": {name: value | [source id, output slot]}, "class_type", "_meta": {"title"}}}`.
"""

from __future__ import annotations

MODE_ALWAYS, MODE_MUTED, MODE_BYPASS = 0, 2, 4
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = ("seed", "noise_seed")
CONTROL_AFTER_GENERATE = "control_after_generate"
CONTROL_VALUES = ["fixed", "increment", "decrement", "randomize"]
# Nodes that exist only in the frontend: never sent to the server.
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


# --- spec-only stand-ins for the stock ComfyUI nodes our examples use (inputs and outputs as ComfyUI declares them) ---

class LoadAudio:
    """comfy_extras/nodes_audio.py. The combo lists ComfyUI's input folder; unknown here, so it is empty."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"audio": ([], {"audio_upload": True})}}

    RETURN_TYPES = ("AUDIO",)
    DISPLAY_NAME = "Load Audio"


class SaveAudio:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"audio": ("AUDIO",), "filename_prefix": ("STRING", {"default": "audio/ComfyUI"})},
                "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    DISPLAY_NAME = "Save Audio (FLAC)"


class PreviewAudio:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"audio": ("AUDIO",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    DISPLAY_NAME = "Preview Audio"


class PreviewImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}, "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    DISPLAY_NAME = "Preview Image"


class PrimitiveStringMultiline:
    """comfy_extras/nodes_primitive.py: one text feeding several nodes' STRING widgets."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("STRING", {"multiline": True})}}

    RETURN_TYPES = ("STRING",)
    DISPLAY_NAME = "String (Multiline)"


class PrimitiveInt:
    @classmethod
    def INPUT_TYPES(cls):
        big = 2**63 - 1  # sys.maxsize on 64-bit
        return {"required": {"value": ("INT", {"min": -big, "max": big, "control_after_generate": True})}}

    RETURN_TYPES = ("INT",)
    DISPLAY_NAME = "Int"


class Note:
    """Frontend-only text node (one multiline widget); MarkdownNote is the same with Markdown rendering."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True})}}

    RETURN_TYPES = ()
    DISPLAY_NAME = "Note"


class MarkdownNote(Note):
    DISPLAY_NAME = "Markdown Note"


STOCK_NODES = {cls.__name__: cls for cls in (LoadAudio, SaveAudio, PreviewAudio, PreviewImage, PrimitiveStringMultiline,
                                             PrimitiveInt, Note, MarkdownNote)}


# --- node interfaces ---

def node_inputs(cls) -> dict[str, tuple]:
    """Visible inputs of a node class, required then optional: {name: (type, options)}."""
    spec = cls.INPUT_TYPES()
    out = {}
    for section in ("required", "optional"):
        for name, entry in (spec.get(section) or {}).items():
            kind, *rest = entry if isinstance(entry, (tuple, list)) else (entry,)
            out[name] = (kind, dict(rest[0]) if rest and isinstance(rest[0], dict) else {})
    return out


def is_widget(kind, options: dict) -> bool:
    if options.get("forceInput"):
        return False
    return isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES


def frontend_widgets(name: str, kind, options: dict) -> list[str]:
    """The frontend's own widgets that follow this widget in `widgets_values` (never sent to the API)."""
    if kind == "INT" and options.get(CONTROL_AFTER_GENERATE, name in SEED_NAMES):
        return [CONTROL_AFTER_GENERATE]
    if options.get("audio_upload"):
        return ["audioUI", "upload"]
    if options.get("image_upload"):
        return ["upload"]
    return []


def widget_slots(cls) -> list[tuple[str, bool]]:
    """Positions of `widgets_values`: [(name, sent_to_api)], e.g. [("seed", True), ("control_after_generate", False)]."""
    slots = []
    for name, (kind, options) in node_inputs(cls).items():
        if is_widget(kind, options):
            slots.append((name, True))
            slots += [(extra, False) for extra in frontend_widgets(name, kind, options)]
    return slots


def widget_count_fits(cls, slots: list[tuple[str, bool]], n_values: int) -> bool:
    """A node's stored widget values fit its widget slots: all of them, or all but trailing OPTIONAL widgets that
    were added to the node after the workflow was saved (the frontend, and the API, give those their defaults)."""
    if n_values == len(slots):
        return True
    optional = set(cls.INPUT_TYPES().get("optional") or {})
    return n_values < len(slots) and all(name in optional for name, sent in slots[n_values:] if sent)


def socket_inputs(cls) -> list[tuple[str, str, bool]]:
    """Inputs drawn as sockets (not widgets): [(name, type, optional)]."""
    spec = cls.INPUT_TYPES()
    required = set(spec.get("required") or {})
    return [(name, kind, name not in required) for name, (kind, options) in node_inputs(cls).items()
            if not is_widget(kind, options)]


def input_type(kind) -> str:
    return "COMBO" if isinstance(kind, (list, tuple)) else str(kind)


# --- UI format access (both link layouts: [id, from, slot, to, slot, type] lists and schema-1 objects) ---

def ui_links(ui: dict) -> dict[int, dict]:
    links = {}
    for link in ui.get("links") or []:
        if isinstance(link, dict):
            entry = {k: link[k] for k in ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")}
        else:
            entry = dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), link))
        links[entry["id"]] = entry
    return links


def _reject_subgraphs(ui: dict) -> None:
    if (ui.get("definitions") or {}).get("subgraphs"):
        raise ValueError("workflow uses subgraphs; convert them to nodes (right click > Unpack Subgraph) first")


def _source(link_id, links: dict, nodes: dict, wanted_type: str):
    """Where an input really comes from: [node id, slot] after skipping bypassed nodes and reroutes, or None (muted
    source, or a bypassed node with no matching input, or a frontend primitive whose value is already stored)."""
    seen = set()
    while link_id is not None and link_id not in seen:
        seen.add(link_id)
        link = links.get(link_id)
        if link is None:
            raise ValueError(f"link {link_id} is referenced by a node but missing from 'links'")
        origin = nodes.get(link["origin_id"])
        if origin is None:
            raise ValueError(f"link {link_id} starts at node {link['origin_id']}, which does not exist")
        mode = origin.get("mode", MODE_ALWAYS)
        if origin["type"] == "Reroute":
            link_id = (origin.get("inputs") or [{}])[0].get("link")
        elif mode == MODE_BYPASS:
            inputs = origin.get("inputs") or []
            order = [link["origin_slot"]] + list(range(len(inputs)))
            match = next((inputs[i] for i in order if i < len(inputs) and inputs[i].get("type") == wanted_type), None)
            link_id = match.get("link") if match else None
        elif mode == MODE_MUTED or origin["type"] in FRONTEND_ONLY:
            return None
        else:
            return [str(origin["id"]), int(link["origin_slot"])]
    return None


def ui_to_api(ui_workflow: dict, node_classes: dict, stock_nodes: dict | None = None,
              display_names: dict | None = None) -> dict:
    """UI ("save") workflow -> API prompt for `POST /prompt`.

    node_classes: {class_type: class} (e.g. our NODE_CLASS_MAPPINGS); stock_nodes: ComfyUI's own nodes the graph uses
    (default `STOCK_NODES`); display_names: titles for nodes without their own `title` (else the class name).
    Raises ValueError naming the node when a type is unknown or its widget values do not fit its inputs."""
    _reject_subgraphs(ui_workflow)
    classes = {**(STOCK_NODES if stock_nodes is None else stock_nodes), **node_classes}
    nodes = {node["id"]: node for node in ui_workflow.get("nodes") or []}
    links = ui_links(ui_workflow)
    prompt = {}
    for node_id in sorted(nodes, key=lambda i: str(i).zfill(12)):  # numeric order for the usual int ids
        node = nodes[node_id]
        kind = node["type"]
        if kind in FRONTEND_ONLY or node.get("mode", MODE_ALWAYS) in (MODE_MUTED, MODE_BYPASS):
            continue
        cls = classes.get(kind)
        if cls is None:
            raise ValueError(f"node {node_id}: unknown node type {kind!r} (not in our mappings or the stock list)")
        inputs = {}
        values = node.get("widgets_values")
        slots = widget_slots(cls)
        if isinstance(values, dict):  # some frontends/packs store widgets by name
            inputs.update({name: values[name] for name, sent in slots if sent and name in values})
        else:
            values = list(values or [])
            if not widget_count_fits(cls, slots, len(values)):
                raise ValueError(f"node {node_id} ({kind}): {len(values)} widget values for {len(slots)} widgets "
                                 f"{[name for name, _ in slots]}")
            inputs.update({name: value for (name, sent), value in zip(slots, values) if sent})
        for socket in node.get("inputs") or []:
            if socket.get("link") is None:
                continue
            source = _source(socket["link"], links, nodes, socket.get("type"))
            if source is not None:
                inputs[socket["name"]] = source  # a linked widget keeps its stored value in the UI, not in the API
            elif socket.get("widget") is None:
                inputs.pop(socket["name"], None)
        title = node.get("title") or (display_names or {}).get(kind) or getattr(cls, "DISPLAY_NAME", kind)
        prompt[str(node_id)] = {"inputs": inputs, "class_type": kind, "_meta": {"title": title}}
    return prompt


# --- checks ---

def check_widget_value(name: str, kind, options: dict, value) -> str | None:
    """Why `value` does not fit a widget input, or None when it does."""
    if isinstance(kind, (list, tuple)):
        return None if value in kind else f"{name}={value!r} is not one of {list(kind)[:8]}"
    if kind == "COMBO":
        choices = options.get("options") or []
        return None if value in choices else f"{name}={value!r} is not one of {choices[:8]}"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}={value!r} is not a boolean"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{name}={value!r} is not a string"
    if kind in ("INT", "FLOAT"):
        number = (int,) if kind == "INT" else (int, float)
        if isinstance(value, bool) or not isinstance(value, number):
            return f"{name}={value!r} is not {'an INT' if kind == 'INT' else 'a FLOAT'}"
        lo, hi = options.get("min"), options.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            return f"{name}={value!r} is outside [{lo}, {hi}]"
    return None


def check_ui_workflow(ui_workflow: dict, node_classes: dict, stock_nodes: dict | None = None) -> list[str]:
    """Problems of a UI workflow, one line each (empty = fine): unknown node types, widget values that do not match
    the node's widget inputs in count, order and type/range, and links between incompatible or missing sockets."""
    _reject_subgraphs(ui_workflow)
    classes = {**(STOCK_NODES if stock_nodes is None else stock_nodes), **node_classes}
    nodes = {node["id"]: node for node in ui_workflow.get("nodes") or []}
    problems = []
    for node_id, node in nodes.items():
        cls = classes.get(node["type"])
        where = f"node {node_id} ({node['type']})"
        if cls is None:
            if node["type"] not in FRONTEND_ONLY:
                problems.append(f"{where}: unknown node type")
            continue
        spec = node_inputs(cls)
        slots = widget_slots(cls)
        values = node.get("widgets_values") or []
        if isinstance(values, dict):
            values = [values.get(name) for name, _ in slots]
        if not widget_count_fits(cls, slots, len(values)):
            problems.append(f"{where}: {len(values)} widget values for {len(slots)} widgets {[n for n, _ in slots]}")
            continue
        for (name, sent), value in zip(slots, values):
            if sent:
                kind, options = spec[name]
                why = check_widget_value(name, kind, options, value)
            elif name == CONTROL_AFTER_GENERATE:
                why = None if value in CONTROL_VALUES else f"{name}={value!r} is not one of {CONTROL_VALUES}"
            else:
                why = None
            if why:
                problems.append(f"{where}: {why}")
        for socket in node.get("inputs") or []:
            if socket["name"] not in spec:
                problems.append(f"{where}: input {socket['name']!r} is not an input of the node")
    for link in ui_links(ui_workflow).values():
        where = f"link {link['id']}"
        origin, target = nodes.get(link["origin_id"]), nodes.get(link["target_id"])
        if origin is None or target is None:
            problems.append(f"{where}: connects a missing node")
            continue
        out_types = _output_types(origin, classes)
        if link["origin_slot"] >= len(out_types):
            problems.append(f"{where}: node {origin['id']} has no output {link['origin_slot']}")
            continue
        target_inputs = target.get("inputs") or []
        if link["target_slot"] >= len(target_inputs):
            problems.append(f"{where}: node {target['id']} has no input slot {link['target_slot']}")
            continue
        socket = target_inputs[link["target_slot"]]
        if socket.get("link") != link["id"]:
            problems.append(f"{where}: node {target['id']} input {socket['name']!r} does not point back to it")
        out_type = out_types[link["origin_slot"]]
        target_cls = classes.get(target["type"])
        in_type = input_type(node_inputs(target_cls)[socket["name"]][0]) if target_cls and socket["name"] in \
            node_inputs(target_cls) else socket.get("type")
        if "*" not in (out_type, in_type) and out_type != in_type:
            problems.append(f"{where}: {origin['type']} output {link['origin_slot']} ({out_type}) feeds "
                            f"{target['type']}.{socket['name']} ({in_type})")
        if link.get("type") not in (None, "*", out_type):
            problems.append(f"{where}: declared type {link['type']} but the output is {out_type}")
    return problems


def _output_types(node: dict, classes: dict) -> list[str]:
    cls = classes.get(node["type"])
    if cls is None:  # frontend-only nodes (Reroute): trust the saved sockets
        return [out.get("type", "*") for out in node.get("outputs") or []]
    return [input_type(t) for t in cls.RETURN_TYPES]
