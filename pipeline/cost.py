"""Cost per stage: wall, CPU and GPU time, peak memory, energy and CO2e, recorded in every stage's manifest.

`Meter` is started by the shared stage machinery (`runs.StageRun`), so every stage gets it without code of its own:
wall and CPU time count from the start of the stage's process (library imports included) to its manifest, energy
from the moment its inputs are validated (`StageRun.prepare`: bad input starts no tracker) to its manifest.
Energy comes from codecarbon's `OfflineEmissionsTracker` (no network; `tracking_mode="process"`: the stage process
and its children), started in a background thread so its hardware probe (about 2 s on a 2-CPU VM) does not hold
up the stage. Where the CPU has no power
counters (RAPL) codecarbon estimates the CPU's power from its TDP and the process's CPU load, and RAM power always
from a model: `energy_method` says which, `energy_estimate` is true when the CPU part is such an estimate.

CO2e = energy x the grid's carbon intensity: the recipe's `run.carbon_intensity_g_per_kwh` when set, else
codecarbon's figure for the country `run.carbon_country` (ISO 3166 alpha-3, default USA). Cost accounting never
stops a stage: a tracker that fails, or codecarbon missing, leaves wall/CPU/memory recorded and `energy_error`.

`cost_table` formats the runner's table (and `--check`'s projection, pipeline/cost_check.py) in the style of a
carbon table: stage, parameters, wall, energy kWh, intensity gCO2e/kWh, CO2e kg, and a total row.
"""

from __future__ import annotations

import functools
import json
import logging
import resource
import struct
import sys
import threading
import time
from pathlib import Path

from pipeline.cli import typed_line

DEFAULT_COUNTRY = "USA"
MEASURE_POWER_SECS = 15     # codecarbon's own default: one power sample per 15 s (and one at the stop)
ATTEMPT_WAIT_S = 10         # an attempt that stops early waits this long for its energy figure (a signal's grace)
ATTEMPT_KEYS = ("wall_s", "cpu_s", "gpu_hours", "peak_rss_mb", "energy_kwh", "energy_cpu_kwh", "energy_gpu_kwh",
                "energy_ram_kwh", "energy_error")
START_WAIT_S = 60           # at the stop, how long to wait for a tracker still starting before giving up on energy
RECIPE_INTENSITY = "recipe run.carbon_intensity_g_per_kwh"
# codecarbon's CPU modes: (what to call it, an estimate rather than a counter?)
CPU_METHODS = {
    "intel_rapl": ("RAPL counters", False),
    "intel_power_gadget": ("Intel Power Gadget", False),
    "apple_powermetrics": ("powermetrics", False),
    "windows_emi": ("Windows EMI counters", False),
    "cpu_load": ("estimate from TDP x CPU load", True),
    "constant": ("estimate from TDP (constant)", True),
}


def codecarbon_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("codecarbon")
    except metadata.PackageNotFoundError:
        return None


def _quiet_codecarbon() -> None:
    """codecarbon logs to its own stderr handler (a WARNING that several instances may run, even at log level
    error, and an INFO line before the level is set): drop its records before any handler sees them."""
    logger = logging.getLogger("codecarbon")
    if not any(isinstance(f, _Drop) for f in logger.filters):
        logger.addFilter(_Drop())
    logger.setLevel(logging.ERROR)


class _Drop(logging.Filter):
    def filter(self, record) -> bool:
        return False


def offline_tracker(country: str, intensity: float | None = None):
    """codecarbon's offline tracker for this process and its children, writing nothing, printing nothing, reading
    nothing from the network. The explicit arguments win over a user's ~/.codecarbon.config: no output file, API or
    endpoint; a known intensity is forced, so no grid-data service is asked."""
    _quiet_codecarbon()
    from codecarbon import OfflineEmissionsTracker

    extra = {"force_carbon_intensity_g_co2e_kwh": intensity} if intensity is not None else {}
    return OfflineEmissionsTracker(country_iso_code=country, log_level="error", output_methods=[],
                                   emissions_endpoint=False, measure_power_secs=MEASURE_POWER_SECS,
                                   tracking_mode="process",
                                   allow_multiple_runs=True,  # False takes a lock file and installs signal handlers
                                   **extra)


@functools.lru_cache(maxsize=None)  # the tracker's start and the stop both ask: codecarbon's data read once
def grid_intensity(country: str | None, recipe_value: float | None) -> tuple[float | None, str]:
    """(gCO2e per kWh, where it comes from): the recipe's figure, else codecarbon's for the country (its energy-mix
    data, read offline), else its world average."""
    if recipe_value is not None:
        return float(recipe_value), RECIPE_INTENSITY
    country = (country or DEFAULT_COUNTRY).upper()
    try:
        _quiet_codecarbon()
        from codecarbon.input import DataSource

        mix = DataSource().get_global_energy_mix_data().get(country)
        if mix and mix.get("carbon_intensity") is not None:
            return float(mix["carbon_intensity"]), f"codecarbon {country} {mix.get('year', '')}".rstrip()
        world = DataSource().get_carbon_intensity_per_source_data()["world_average"]
        return float(world), f"codecarbon world average (no data for {country})"
    except Exception as err:  # codecarbon missing or its data unreadable: no CO2e, and why
        return None, f"unknown ({typed_line(err, 200)})"


def process_start() -> float:
    """When this process started (epoch seconds); now, if that cannot be read."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:
        return time.time()


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def peak_rss_mb() -> float:
    """Peak resident memory of this process (or of its largest finished child, if larger), in MiB."""
    kib = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return kib / (1 << 20) if sys.platform == "darwin" else kib / 1024  # macOS reports bytes, Linux KiB


def energy_method(tracker) -> tuple[str, bool | None]:
    """What codecarbon measured with: (description, CPU part an estimate?). Read from its hardware list."""
    parts, estimate = [], None
    for hw in getattr(tracker, "_hardware", []):
        kind = type(hw).__name__
        if kind == "CPU":
            name, estimate = CPU_METHODS.get(getattr(hw, "_mode", ""), (f"mode {getattr(hw, '_mode', '?')}", True))
            parts.append(f"cpu: {name}")
        elif kind == "GPU":
            parts.append("gpu: NVML/AMD SMI counters")
        elif kind == "RAM":
            parts.append("ram: estimate (codecarbon's RAM model)")
        else:
            parts.append(f"{kind.lower()}: {hw!r}")
    mode = getattr(tracker, "_tracking_mode", "?")
    return f"codecarbon {codecarbon_version()} {mode} mode; " + ("; ".join(parts) or "no hardware found"), estimate


class Meter:
    """Times one stage and, once `start_energy` is called, tracks its energy in a background thread.

    `tracker_factory(country, intensity)` builds the tracker (tests pass their own); it and its `start`/`stop` may
    fail or hang: the stage goes on, and the cost block says why energy is missing."""

    def __init__(self, country: str | None = None, intensity: float | None = None, tracker_factory=None,
                 whole_process: bool = False):
        """whole_process: count wall and CPU time from the start of the process (a stage's process: its whole cost),
        else from now."""
        self.country = (country or DEFAULT_COUNTRY).upper()
        self.intensity = intensity
        self._factory = tracker_factory or offline_tracker
        self._t0, self._cpu0 = (process_start(), 0.0) if whole_process else (time.time(), _cpu_seconds())
        self._thread: threading.Thread | None = None
        self._tracker = None
        self._error: str | None = None
        self._done = False          # stopped or abandoned: a tracker that starts late stops itself
        self._lock = threading.Lock()

    def start_energy(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._start_tracker, name="cost-meter", daemon=True)
            self._thread.start()

    def _start_tracker(self) -> None:
        try:
            tracker = self._factory(self.country, grid_intensity(self.country, self.intensity)[0])
            tracker.start()
        except Exception as err:
            self._error = f"codecarbon did not start ({typed_line(err, 200)})"
            return
        with self._lock:
            if not self._done:
                self._tracker = tracker
                return
        _stop_quietly(tracker)

    def abandon(self) -> None:
        """The stage ends without a manifest (an error, a signal): stop tracking, wait for nothing."""
        with self._lock:
            self._done, tracker, self._tracker = True, self._tracker, None
        if tracker is not None:
            _stop_quietly(tracker)

    def _times(self, gpus: int) -> dict:
        wall = time.time() - self._t0
        return {"wall_s": round(wall, 1), "cpu_s": round(_cpu_seconds() - self._cpu0, 1),
                "gpu_hours": round(gpus * wall / 3600, 4), "gpus": gpus, "peak_rss_mb": round(peak_rss_mb(), 1)}

    def attempt(self, gpus: int = 0, wait_s: float = ATTEMPT_WAIT_S) -> dict:
        """What an attempt that stops before finishing (a signal, an error) cost so far: wall, CPU and GPU time, peak
        memory and, when the tracker stops within `wait_s`, its energy. The finished attempt adds it to its own."""
        out = self._times(gpus)
        box: dict = {}
        worker = threading.Thread(target=lambda: box.update(self._stop_energy()), name="cost-attempt", daemon=True)
        worker.start()
        worker.join(wait_s)
        out.update(box or {"energy_kwh": None, "energy_error": f"codecarbon did not stop within {wait_s:g} s"})
        return out

    def stop(self, gpus: int = 0, parameters: int | None = None, parameters_of: str | None = None,
             peak_gpu_mem_mb: float | None = None, earlier: list[dict] | None = None) -> dict:
        """The manifest's `cost` block. `gpus`: devices the stage ran on (processes on CUDA), 0 on CPU. `earlier`:
        the `attempt` records of runs of this stage that stopped before finishing (resumed here); wall, CPU and GPU
        time, energy and CO2e are then sums over every attempt, listed under `attempts`."""
        out = self._times(gpus)
        if peak_gpu_mem_mb is not None:
            out["peak_gpu_mem_mb"] = round(peak_gpu_mem_mb, 1)
        out.update({"parameters": parameters, "parameters_of": parameters_of})
        energy = self._stop_energy()
        out.update(energy)
        intensity, source = grid_intensity(self.country, self.intensity)
        out.update({"carbon_intensity_g_per_kwh": intensity, "carbon_intensity_source": source,
                    "carbon_country": self.country})
        kwh = energy.get("energy_kwh")
        out["co2e_kg"] = kwh * intensity / 1000 if kwh is not None and intensity is not None else None
        return with_attempts(out, earlier) if earlier else out

    def _stop_energy(self) -> dict:
        if self._thread is None:
            return {"energy_kwh": None, "energy_error": "energy tracking was not started"}
        self._thread.join(START_WAIT_S)
        with self._lock:
            self._done, tracker, self._tracker = True, self._tracker, None
        if self._thread.is_alive():
            return {"energy_kwh": None, "energy_error": f"codecarbon did not start within {START_WAIT_S} s"}
        if tracker is None:
            return {"energy_kwh": None, "energy_error": self._error or "codecarbon did not start"}
        try:
            tracker.stop()
            data = tracker.final_emissions_data
            method, estimate = energy_method(tracker)
            return {"energy_kwh": float(data.energy_consumed), "energy_cpu_kwh": float(data.cpu_energy),
                    "energy_gpu_kwh": float(data.gpu_energy), "energy_ram_kwh": float(data.ram_energy),
                    "energy_method": method, "energy_estimate": estimate,
                    "energy_tracked_s": round(float(data.duration), 1)}
        except Exception as err:
            return {"energy_kwh": None, "energy_error": f"codecarbon failed at the stop ({typed_line(err, 200)})"}


def with_attempts(last: dict, earlier: list[dict]) -> dict:
    """The cost block of a stage finished after `earlier` unfinished attempts: sums over all of them (energy only
    when every attempt has it: a partial sum would look whole), each attempt under `attempts`."""
    attempts = [*earlier, {k: last.get(k) for k in ATTEMPT_KEYS}]
    out = dict(last, attempts=attempts)
    for key in ("wall_s", "cpu_s", "gpu_hours"):
        out[key] = round(sum(a.get(key) or 0.0 for a in attempts), 4 if key == "gpu_hours" else 1)
    out["peak_rss_mb"] = max(a.get("peak_rss_mb") or 0.0 for a in attempts)
    if any(a.get("energy_kwh") is None for a in attempts):
        missing = sum(a.get("energy_kwh") is None for a in attempts)
        out.update(energy_kwh=None, co2e_kg=None,
                   energy_error=f"{missing} of {len(attempts)} attempts have no energy figure")
        return out
    out["energy_kwh"] = sum(a["energy_kwh"] for a in attempts)
    for key in ("energy_cpu_kwh", "energy_gpu_kwh", "energy_ram_kwh"):
        if all(a.get(key) is not None for a in attempts):
            out[key] = sum(a[key] for a in attempts)
    intensity = out.get("carbon_intensity_g_per_kwh")
    out["co2e_kg"] = out["energy_kwh"] * intensity / 1000 if intensity is not None else None
    return out


def _stop_quietly(tracker) -> None:
    try:
        tracker.stop()
    except Exception:
        pass


# ---------------------------------------------------------------------------------------------- parameters


def _safetensors_numel(path: Path) -> int:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    total = 0
    for name, info in header.items():
        if name != "__metadata__":
            count = 1
            for dim in info["shape"]:
                count *= dim
            total += count
    return total


def saved_parameters(folder) -> tuple[int | None, str | None]:
    """(parameter count, of what) from the safetensors headers a stage saved: its model (sharded or not), a
    merged model beside an adapter, a diffusers pipeline's components, or else the adapter alone. (None, None)
    when the stage saved no weights (e.g. eval) or they cannot be read."""
    folder = Path(folder)
    try:
        index = folder / "model_index.json"
        if index.is_file():  # a diffusers pipeline: the components it lists
            listed = json.loads(index.read_text()).items()
            names = [k for k, v in listed if isinstance(v, list) and (folder / k).is_dir()]
            files = [f for name in names for f in sorted((folder / name).glob("*.safetensors"))]
            return (sum(map(_safetensors_numel, files)), f"pipeline ({', '.join(names)})") if files else (None, None)
        for where, what in ((folder, "model"), (folder / "merged", "merged model")):
            files = sorted(where.glob("model*.safetensors"))
            if files:
                return sum(map(_safetensors_numel, files)), what
        if (folder / "adapter_model.safetensors").is_file():
            return _safetensors_numel(folder / "adapter_model.safetensors"), "adapter"
    except (OSError, ValueError, KeyError, struct.error):
        pass
    return None, None


# ---------------------------------------------------------------------------------------------- the table


def human_count(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def human_time(seconds) -> str:
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def _num(x, fmt="{:.3g}") -> str:
    return "-" if x is None else fmt.format(x)


def cost_table(rows: list[dict]) -> list[str]:
    """Markdown lines: a row per stage (dicts with stage, parameters, wall_s, energy_kwh, carbon_intensity_g_per_kwh,
    co2e_kg) and a total (sums; the intensity of the total is its CO2e over its energy)."""
    lines = ["| stage | parameters | wall | energy kWh | intensity gCO2e/kWh | CO2e kg |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {human_count(r.get('parameters'))} | {human_time(r.get('wall_s'))} | "
                     f"{_num(r.get('energy_kwh'))} | {_num(r.get('carbon_intensity_g_per_kwh'), '{:.0f}')} | "
                     f"{_num(r.get('co2e_kg'))} |")
    total = totals(rows)
    lines.append(f"| **total** | | {human_time(total['wall_s'])} | {_num(total['energy_kwh'])} | "
                 f"{_num(total['carbon_intensity_g_per_kwh'], '{:.0f}')} | {_num(total['co2e_kg'])} |")
    return lines


def totals(rows: list[dict]) -> dict:
    """Sums over the rows; energy and CO2e are None when any row lacks them (a partial sum would look whole)."""
    def total(key):
        values = [r.get(key) for r in rows]
        return None if not values or any(v is None for v in values) else sum(values)

    energy, co2e = total("energy_kwh"), total("co2e_kg")
    intensity = co2e / energy * 1000 if energy and co2e is not None else None
    return {"wall_s": total("wall_s") or 0, "energy_kwh": energy, "co2e_kg": co2e,
            "carbon_intensity_g_per_kwh": intensity, "cpu_s": total("cpu_s"), "gpu_hours": total("gpu_hours")}


def run_report(stages: list[str], manifests: dict[str, dict | None], run_dir, lead: str | None = None) -> list[str]:
    """The runner's cost section: `lead` (a line above the table), the table over the stages' manifests, then what
    each stage's figures rest on."""
    rows, notes = [], []
    for stage in stages:
        manifest = manifests.get(stage)
        cost = (manifest or {}).get("cost")
        if not cost:
            notes.append(f"- {stage}: {'not run yet' if manifest is None else 'finished before cost accounting'} "
                         f"(not in the table)")
            continue
        rows.append({"stage": stage, **cost})
        how = cost.get("energy_method") or f"no energy: {cost.get('energy_error')}"
        tries = f" over {len(cost['attempts'])} attempts (it was stopped and resumed)" if cost.get("attempts") else ""
        notes.append(f"- {stage}: CPU {human_time(cost.get('cpu_s'))}, GPU {cost.get('gpu_hours', 0):.3g} h, "
                     f"peak RSS {cost.get('peak_rss_mb', 0):.0f} MiB{tries}; intensity from "
                     f"{cost.get('carbon_intensity_source')}; energy {how}")
    lines = [f"# Cost of run {run_dir}", "", *([lead, ""] if lead else []), *cost_table(rows), ""]
    lines += ["Energy comes from codecarbon's offline tracker: where it says `estimate`, the CPU's power is estimated "
              "from its TDP and load (no power counters), not measured. CO2e = energy x intensity.", "", *notes]
    return lines
