// The demos timeline: a step slider; per step the demos' audio players with their tinted spectrograms and settings
// (prompt, base/ARC, CFG, steps, seed); "play through" continues with the next demo and then the next step. Above it,
// the run's dataset clips (decoded by the model's autoencoder) to compare the demos with.

import { baseName, demoSteps, referenceClips } from "./series.js";
import { el } from "./dom.js";

function settingsText(s = {}) {
  const parts = [s.arc ? "ARC" : "base"];
  if (s.mode && s.mode !== "generate" && s.region) {
    parts.push(`${s.mode} ${Number(s.region[0]).toFixed(1)}–${Number(s.region[1]).toFixed(1)} s of ${baseName(s.source_file || "")}`);
  }
  if (s.cfg !== undefined && s.cfg !== null) parts.push(`CFG ${s.cfg}`);
  if (s.steps) parts.push(`${s.steps} steps`);
  if (s.seed !== undefined && s.seed !== null) parts.push(`seed ${s.seed}`);
  if (s.duration) parts.push(`${Number(s.duration).toFixed(1)} s`);
  if (s.lora_strength !== undefined && s.lora_strength !== 1) parts.push(`strength ${s.lora_strength}`);
  if (s.lora_skip_first_steps) parts.push(`LoRA off for ${s.lora_skip_first_steps} step${s.lora_skip_first_steps > 1 ? "s" : ""}`);
  const level = levelText(s);
  if (level) parts.push(level);
  return parts.join(" · ");
}

/** The clip's level as generated and the gain that brought it to the run's demo loudness (training/demos.py
 * `write_clip`), or "" for a run that keeps demos as generated. */
function levelText(s) {
  if (s.loudness_lufs === undefined) return "";
  if (s.nonfinite) return "NaN/inf samples: not normalised";
  if (s.loudness_lufs === null) return "silent";
  const oneDecimal = (v) => (Math.abs(v) < 0.05 ? 0 : v).toFixed(1);  // no "-0.0" for what rounds to zero
  const gain = Number(s.gain_db || 0);
  const limit = s.limited_by ? ` (${s.limited_by} limit)` : "";
  const gainText = Math.abs(gain) < 0.05 ? "" : `, ${gain > 0 ? "+" : ""}${oneDecimal(gain)} dB${limit}`;
  return `${oneDecimal(Number(s.loudness_lufs))} LUFS as generated${gainText}`;
}

function promptText(prompt) {
  if (prompt === "") return "(unconditional)";
  if (prompt === null || prompt === undefined) return "(prompt from the dataset)";
  return prompt;
}

export function mount(root, store, { useCheckpoint }) {
  const section = root.appendChild(el("section", "sa3-demos"));
  section.setAttribute("aria-label", "Demos");
  const head = section.appendChild(el("div", "sa3-section-head"));
  head.appendChild(el("h3", null, "Demos"));
  const autoLabel = head.appendChild(el("label", "sa3-check"));
  const auto = autoLabel.appendChild(el("input"));
  auto.type = "checkbox";
  auto.checked = true;
  auto.dataset.control = "play-through";
  autoLabel.append(" play through steps");

  const sliderRow = section.appendChild(el("div", "sa3-slider-row"));
  const sliderLabel = sliderRow.appendChild(el("label", "sa3-slider-label"));
  sliderLabel.htmlFor = "sa3-demo-step";
  const slider = sliderRow.appendChild(el("input", "sa3-slider"));
  slider.type = "range";
  slider.id = "sa3-demo-step";
  slider.min = "0";
  slider.step = "1";
  const useStep = sliderRow.appendChild(el("button", "sa3-button sa3-small", "Use this step"));
  useStep.type = "button";
  useStep.dataset.action = "use-step";
  const downloadStep = sliderRow.appendChild(el("a", "sa3-button sa3-small", "Download"));
  downloadStep.dataset.action = "download-step";
  const references = section.appendChild(el("details", "sa3-references"));
  references.hidden = true;
  references.appendChild(el("summary", null, "Dataset clips (what the adapter learns from)"));
  const refCards = references.appendChild(el("div", "sa3-demo-cards"));
  const cards = section.appendChild(el("div", "sa3-demo-cards"));
  const empty = section.appendChild(el("p", "sa3-empty", "No demos yet: they appear every demo_every steps."));

  let runId = null;
  let steps = [];
  let index = -1;
  let signature = "";

  function stepLabel() {
    const s = steps[index];
    sliderLabel.textContent = s ? `Step ${s.step} (${index + 1} of ${steps.length})` : "Step –";
    slider.setAttribute("aria-valuetext", s ? `step ${s.step}` : "none");
  }

  function card(demo, position, reference = false) {
    const c = el("article", reference ? "sa3-demo sa3-reference" : "sa3-demo");
    const n = demo.index ?? position;
    if (!reference) c.dataset.step = String(demo.step);
    c.dataset.index = String(n);
    const s = demo.settings || {};
    const what = reference ? `dataset clip ${n} (${baseName(s.file || "")})` : `demo ${n} at step ${demo.step}`;
    c.appendChild(el("h4", null, reference ? `Clip ${n}` : `Demo ${n}`));
    const prompt = c.appendChild(el("p", "sa3-demo-prompt", promptText(s.prompt)));
    prompt.title = prompt.textContent;
    const detail = reference ? [s.file || "", s.duration ? `${Number(s.duration).toFixed(1)} s` : "", levelText(s)]
      .filter(Boolean).join(" · ") : settingsText(s);
    c.appendChild(el("p", "sa3-demo-settings", detail)).title = detail;
    if (demo.image) {
      const wrap = c.appendChild(el("div", "sa3-spec"));
      const img = wrap.appendChild(el("img"));
      img.src = store.api.fileUrl(runId, demo.image);
      img.alt = `Spectrogram of ${what}`;
      img.loading = "lazy";
      wrap.appendChild(el("div", "sa3-playhead"));
    }
    if (demo.audio) {
      const audio = c.appendChild(el("audio"));
      audio.controls = true;
      audio.preload = "metadata";
      audio.src = store.api.fileUrl(runId, demo.audio);
      audio.setAttribute("aria-label", `${what[0].toUpperCase()}${what.slice(1)}: ${baseName(demo.audio)}`);
      const head = c.querySelector(".sa3-playhead");
      audio.addEventListener("timeupdate", () => {
        if (head && audio.duration) head.style.left = `${(100 * audio.currentTime) / audio.duration}%`;
      });
      audio.addEventListener("play", () => {
        for (const other of section.querySelectorAll("audio")) if (other !== audio) other.pause();
      });
      if (!reference) audio.addEventListener("ended", () => playNext(audio));
      c.querySelector(".sa3-spec")?.addEventListener("click", (e) => {
        // click on the spectrogram = seek there
        const rect = e.currentTarget.getBoundingClientRect();
        if (audio.duration) audio.currentTime = ((e.clientX - rect.left) / rect.width) * audio.duration;
        audio.play().catch(() => {});
      });
    }
    return c;
  }

  function show(i) {
    index = Math.max(0, Math.min(steps.length - 1, i));
    slider.value = String(index);
    stepLabel();
    const s = steps[index];
    cards.replaceChildren(...(s ? s.demos.map((demo, i) => card(demo, i)) : []));
    useStep.disabled = !s?.checkpoint;
    useStep.title = s?.checkpoint ? `Add an SA3 Load LoRA node with the checkpoint of step ${s.step}`
      : "No checkpoint was saved at this step";
    useStep.setAttribute("aria-label", useStep.title);
    if (s?.checkpoint) {  // any step's LoRA file, not only the newest (the controls' Download)
      downloadStep.href = store.api.fileUrl(runId, s.checkpoint.path, true);
      downloadStep.removeAttribute("aria-disabled");
      downloadStep.tabIndex = 0;
      downloadStep.setAttribute("aria-label", `Download the checkpoint of step ${s.step}: ${baseName(s.checkpoint.path)}`);
    } else {
      downloadStep.removeAttribute("href");
      downloadStep.setAttribute("aria-disabled", "true");
      downloadStep.tabIndex = -1;
      downloadStep.setAttribute("aria-label", "No checkpoint was saved at this step");
    }
    downloadStep.title = downloadStep.getAttribute("aria-label");
  }

  function playNext(audio) {
    if (!auto.checked) return;
    const players = [...cards.querySelectorAll("audio")];
    const next = players[players.indexOf(audio) + 1];
    if (next) {
      next.play().catch(() => {});
    } else if (index < steps.length - 1) {
      show(index + 1);  // continuous playback: on to the next demo step
      cards.querySelector("audio")?.play().catch(() => {});
    }
  }

  const playing = () => [...section.querySelectorAll("audio")].some((a) => !a.paused && !a.ended);
  let refSignature = "";

  function showReferences(events) {
    const clips = referenceClips(events);
    const sig = clips.map((c) => `${c.index}:${c.audio}`).join(",");
    if (sig === refSignature) return;
    refSignature = sig;
    references.hidden = clips.length === 0;
    refCards.replaceChildren(...clips.map((clip, i) => card(clip, i, true)));
  }

  slider.addEventListener("input", () => show(Number(slider.value)));
  useStep.addEventListener("click", async () => {
    const s = steps[index];
    if (!s?.checkpoint) return;
    store.say(await useCheckpoint({ runId, path: s.checkpoint.path, step: s.step,
      name: baseName(s.checkpoint.path) }));
  });

  const off = store.subscribe("events", ({ run, events }) => {
    const changedRun = (run?.id ?? null) !== runId;
    runId = run?.id ?? null;
    if (changedRun) refSignature = null;
    showReferences(events);
    const next = demoSteps(events);
    const sig = next.map((s) => `${s.step}:${s.demos.length}:${s.checkpoint ? 1 : 0}`).join(",");
    if (!changedRun && sig === signature) return;  // nothing new: leave the players alone
    const atNewest = index === steps.length - 1;
    const shownStep = steps[index]?.step;
    steps = next;
    signature = sig;
    slider.max = String(Math.max(0, steps.length - 1));
    slider.disabled = steps.length < 2;
    empty.hidden = steps.length > 0;
    sliderRow.hidden = steps.length === 0;
    if (changedRun || (atNewest && !playing())) {
      show(steps.length - 1);  // follow the newest demos unless the user is listening to something
    } else {
      const keep = steps.findIndex((s) => s.step === shownStep);
      index = keep >= 0 ? keep : steps.length - 1;
      slider.value = String(index);
      stepLabel();
      if (!playing()) show(index);
    }
  });
  return () => {
    off();
    section.remove();
  };
}
