"""The probe catalog: one torch-free table of what every probe measures.

Each `ProbeSpec` names a probe, where its code lives, the suites it belongs to, the report
section and dashboard page that show it, what it needs from an adapter, and every metric
it writes with its direction (is higher better?), unit, human label and a one-line
meaning. The report, the gate, the dashboard, the runner's plans and the README's probe
table are all derived from here; `tests/test_catalog.py` fails when a registered probe
and its spec disagree.

Third-party probes bring their spec on the probe class (`spec = ProbeSpec(...)`) and
register through the `mmaudit.probes` entry-point group (see `probes.base`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["MetricSpec", "ProbeSpec", "CATALOG", "SUITES", "SECTIONS", "PAGES", "CATEGORIES", "spec_of",
           "metric_spec", "direction", "suite_probes", "register_spec", "all_specs", "markdown_table"]

Direction = Literal["higher", "lower", "none"]

# Report sections and dashboard pages a probe can be shown on (title, one-line purpose).
SECTIONS: dict[str, str] = {
    "fairness": "Fairness and bias",
    "safety": "Safety: hallucination, typographic attacks, robustness",
    "interpretability": "Interpretability: modality reliance, attention, attribution",
    "privacy": "Privacy",
}
PAGES: dict[str, str] = {
    "modality": "Modality reliance",
    "attention": "Attention explorer",
    "bias": "Bias explorer",
    "safety": "Safety",
    "privacy": "Privacy & defenses",
}
CATEGORIES = ("interpretability", "fairness", "safety", "privacy")


@dataclass(frozen=True)
class MetricSpec:
    """One metric a probe writes.

    `dims` names the typed columns its grouped rows are broken down by (audit.schema),
    in the order a chart should use them; `headline` marks the metrics a scorecard shows.
    """

    name: str
    label: str
    meaning: str
    direction: Direction = "none"
    unit: str = "share"  # share | probability | ratio | nats | count | epsilon | p-value | score
    dims: tuple[str, ...] = ()
    headline: bool = False
    target: float | None = None  # the ideal value when it is not an end of the scale (POPE's yes-ratio: 0.5)


@dataclass(frozen=True)
class ProbeSpec:
    """Everything about a probe that is not code."""

    name: str
    title: str
    category: str
    description: str
    citation: str
    metrics: tuple[MetricSpec, ...]
    suites: tuple[str, ...] = ()
    section: str = ""
    page: str = ""
    module: str = ""  # "package.module:Class"; empty for plugins that register the class directly
    needs: tuple[str, ...] = ()  # Capabilities flags that must be true (white_box, hooks, gradients, logprobs ...)
    kinds: tuple[str, ...] = ("generative", "dual_encoder")
    fusions: tuple[str, ...] = ()  # accepted Capabilities.fusion values; empty = any
    extra: str | None = None  # pip extra that provides `requires`
    requires: tuple[str, ...] = ()  # importable modules the probe needs beyond the core install
    black_box: str = "yes"  # what an endpoint gets: "yes" | "no" | a short qualification
    known_answer: str = ""  # the test whose truth is known by construction that backs this probe

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"probe {self.name!r}: unknown category {self.category!r}")
        if self.section and self.section not in SECTIONS:
            raise ValueError(f"probe {self.name!r}: unknown report section {self.section!r}")
        if self.page and self.page not in PAGES:
            raise ValueError(f"probe {self.name!r}: unknown dashboard page {self.page!r}")
        names = [m.name for m in self.metrics]
        if len(set(names)) != len(names):
            raise ValueError(f"probe {self.name!r}: a metric is declared twice")

    def metric(self, name: str) -> MetricSpec | None:
        return next((m for m in self.metrics if m.name == name), None)

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.metrics)


def _m(name, label, meaning, direction: Direction = "none", unit="share", dims=(), headline=False, target=None):
    return MetricSpec(name, label, meaning, direction, unit, tuple(dims), headline, target)


_FULL, _STD, _QUICK = "full", "standard", "quick"

_BUILTIN = (
    ProbeSpec(
        name="modality_ablation", title="Modality ablation", category="interpretability",
        description="Change of the answer distribution when the image or the text is ablated "
                    "(total variation; 0 = that modality is not used).",
        citation="Gat et al. 2021, Perceptual Score: What Data Modalities Does Your Model Perceive? (NeurIPS)",
        suites=(_QUICK, _STD, _FULL), section="interpretability", page="modality",
        module="probes.modality_ablation:ModalityAblation",
        known_answer="blind model (zeroed projector) and `text_shortcut` read exactly 0 (image; `audio_reliance` "
                     "for the audio reference)",
        needs=("logprobs",), metrics=(
            _m("image_reliance", "Image reliance", "How far the answer distribution moves (total variation, 0-1) "
               "when the image is replaced; 0 means the answer ignores the image.", dims=("variant",), headline=True),
            _m("text_reliance", "Text reliance", "How far the answer distribution moves when the prompt is emptied "
               "or swapped; 0 means the answer ignores the question.", dims=("variant",), headline=True),
            _m("image_layer_curve", "Image information left after layer l",
               "Answer change when the image tokens' residual stream is replaced by a blank image's from layer l "
               "on; where it drops to 0 the image has been read.", dims=("layer",)),
            _m("accuracy", "Accuracy under ablation", "Share of reference answers chosen, intact and ablated.",
               "higher", dims=("modality", "variant")),
            _m("perceptual_score_image", "Perceptual score (image)", "Relative accuracy drop when images are "
               "permuted across examples (Gat et al.), averaged over permutations.", unit="ratio"),
            _m("perceptual_score_text", "Perceptual score (text)", "Relative accuracy drop when prompts are "
               "permuted across examples, averaged over permutations.", unit="ratio"),
            _m("audio_reliance", "Audio reliance", "How far the answer distribution moves (total variation, 0-1) "
               "when the audio clip is silenced, replaced by noise or by another example's clip; 0 means the answer "
               "ignores the audio.", dims=("variant",), headline=True),
            _m("perceptual_score_audio", "Perceptual score (audio)", "Relative accuracy drop when audio clips are "
               "permuted across examples, averaged over permutations.", unit="ratio"),
        )),
    ProbeSpec(
        name="attention", title="Attention to the image", category="interpretability",
        description="Share of attention mass from the answer position onto image tokens, per layer and head; "
                    "heatmaps over the image grid; attention rollout.",
        citation="Abnar & Zuidema 2020, Quantifying Attention Flow in Transformers (ACL)",
        suites=(_STD, _FULL), section="interpretability", page="attention", module="probes.attention:AttentionProbe",
        needs=("white_box", "attention_patterns"), kinds=("generative",), fusions=("early",), black_box="no",
        known_answer="capture equals HF `output_attentions` and TransformerLens `hook_pattern`",
        metrics=(
            _m("image_attention_share", "Attention on image tokens", "Mean share of the answer position's "
               "attention that lands on image tokens (all layers and heads).", dims=("layer",), headline=True),
            _m("image_attention_ratio", "Attention on image vs its token share", "Image attention share divided by "
               "the image tokens' share of the sequence; 1 = no preference.", unit="ratio"),
            _m("rollout_image_share", "Rollout share on image", "Image share of attention rollout from the "
               "answer position, which follows attention through all layers."),
        )),
    ProbeSpec(
        name="attention_knockout", title="Attention knockout", category="interpretability",
        description="Relative change of the answer probability when attention edges between image, question, "
                    "template (BOS, roles, image boundaries: the attention sink, reported apart as special->last) "
                    "and last positions are blocked in a window of layers.",
        citation="Zhang et al. 2025, Cross-modal Information Flow in Multimodal Large Language Models (CVPR)",
        suites=(_FULL,), section="interpretability", page="attention",
        module="probes.attention_knockout:AttentionKnockout",
        needs=("white_box", "attention_patterns"), kinds=("generative",), fusions=("early",), black_box="no",
        known_answer="all edges open equals the plain forward; blocking image->last changes a grounded answer",
        metrics=(
            _m("max_effect", "Largest knockout effect", "Largest relative change of the answer probability over "
               "layer windows when the block pair's attention edges are cut; -1 means the answer vanishes.",
               unit="ratio", dims=("position_group", "layer", "layer_end"), headline=True),
            _m("effect", "Knockout effect per window", "Relative change of the answer probability per window of "
               "layers.", unit="ratio", dims=("position_group", "layer", "layer_end")),
        )),
    ProbeSpec(
        name="mm_shap", title="MM-SHAP", category="interpretability",
        description="Shares of Shapley attribution carried by the image (v_shap) and the text (t_shap); "
                    "they sum to 1.",
        citation="Parcalabescu & Frank 2023, MM-SHAP: A Performance-agnostic Metric for Measuring Multimodal "
                 "Contributions in Vision and Language Models & Tasks (ACL)",
        suites=(_FULL,), section="interpretability", page="modality", module="probes.mm_shap:MMShap",
        known_answer="analytic two-player games; blind model reads 0; permutation invariance",
        needs=("logprobs",), metrics=(
            _m("v_shap", "Image share of Shapley value", "Share of the answer's Shapley attribution carried by "
               "image patches; with t_shap it sums to 1.", headline=True),
            _m("t_shap", "Text share of Shapley value", "Share carried by the prompt's words.", headline=True),
            _m("v_shap_sampling_se", "Sampling error of v_shap", "Standard error of the mean v_shap from "
               "permutation sampling (not from the choice of examples).", "lower"),
            _m("a_shap", "Audio share of Shapley value", "Share of the answer's Shapley attribution carried by "
               "the audio clip's time segments; with t_shap (and v_shap when there is an image) it sums to 1.",
               headline=True),
            _m("a_shap_sampling_se", "Sampling error of a_shap", "Standard error of the mean a_shap from "
               "permutation sampling (not from the choice of examples).", "lower"),
        )),
    ProbeSpec(
        name="attribution", title="Integrated Gradients and patch ablation", category="interpretability",
        description="Integrated Gradients at the text-embedding and image-projector layers (text vs image share, "
                    "per-token and per-patch scores) and FeatureAblation over image patches.",
        citation="Sundararajan et al. 2017, Axiomatic Attribution for Deep Networks (ICML); captum "
                 "(Kokhlikyan et al. 2020)",
        suites=(_FULL,), section="interpretability", page="modality", module="probes.attribution:Attribution",
        needs=("white_box", "gradients"), kinds=("generative",), fusions=("early",), extra="interp",
        requires=("captum",), black_box="no",
        known_answer="completeness < 0.05 at 512 steps; an all-zero path raises",
        metrics=(
            _m("completeness_delta", "IG completeness error", "|sum of attributions - (f(x) - f(baseline))| "
               "relative to the gap; small values mean the integral converged.", "lower", unit="ratio"),
            _m("image_attribution_share", "Image share of IG attribution", "Share of absolute Integrated "
               "Gradients attribution on image features.", headline=True),
        )),
    ProbeSpec(
        name="activation_patching", title="Activation patching", category="interpretability",
        description="Share of the clean answer's log-probability restored by patching clean residual-stream "
                    "activations into a run on a counterfactual image, per layer and position group.",
        citation="Meng et al. 2022, Locating and Editing Factual Associations in GPT (NeurIPS)",
        suites=(_FULL,), section="interpretability", page="attention",
        module="probes.activation_patching:ActivationPatching",
        needs=("white_box", "hooks"), kinds=("generative",), fusions=("early",), black_box="no",
        known_answer="blind model: every delta 0; last position at last layer restores 1",
        metrics=(
            _m("image_effect", "Image effect", "Mean |log p(answer | own image) - log p(answer | other image)|; "
               "0 means the image changes nothing.", unit="nats", headline=True),
            _m("restored", "Restored by patching", "Share of the image effect recovered by restoring one layer's "
               "residual stream at one position group.", unit="ratio", dims=("position_group", "layer")),
            _m("patch_delta", "Patch delta", "Change of the answer log-probability from restoring one site.",
               unit="nats", dims=("position_group", "layer")),
        )),
    ProbeSpec(
        name="moe_routing", title="Mixture-of-experts routing by modality", category="interpretability",
        description="Which experts a mixture-of-experts decoder sends image and text tokens to: expert load by "
                    "modality, a modality-specialisation index (normalised mutual information of token modality "
                    "and top-1 expert), router entropy, and how far a blank image moves the text tokens' routing; "
                    "router logits read by forward hooks at language.blocks.{i}.router.",
        citation="Lin et al. 2024, MoE-LLaVA: Mixture of Experts for Large Vision-Language Models; "
                 "Shazeer et al. 2017, Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts "
                 "Layer (ICLR)",
        suites=(_FULL,), section="interpretability", page="modality", module="probes.moe_routing:MoERouting",
        needs=("white_box", "hooks"), kinds=("generative",), fusions=("early",), black_box="no",
        known_answer="`moe` reference model: `specialised` reads 1, `shared` reads 0 (routing fixed by "
                     "construction); router hooks leave logits bit-identical",
        metrics=(
            _m("modality_specialisation", "Modality specialisation of experts", "Normalised mutual information "
               "(2I/(H_M+H_E)) between token modality and top-1 expert, per layer and its mean over layers; "
               "1 = the expert determines the modality, 0 = routing independent of modality.",
               unit="score", dims=("layer",), headline=True),
            _m("router_entropy", "Router entropy", "Mean entropy of the router's softmax over experts per token "
               "(0 = one expert certain, ln(#experts) = uniform), per layer and modality.", unit="nats",
               dims=("modality", "layer"), headline=True),
            _m("expert_load", "Expert load by modality", "Share of a modality's tokens whose top-1 expert is this "
               "expert (variant expert:k), per layer.", dims=("layer", "modality", "variant")),
            _m("routing_shift", "Routing shift without the image", "Total variation between the text tokens' "
               "top-1 expert distributions with the real and with a blank image; 0 = the image does not move "
               "the text's routing.", dims=("layer",)),
        )),
    ProbeSpec(
        name="counterfactual_bias", title="Counterfactual bias", category="fairness",
        description="Answer changes inside counterfactual sets that differ only in one sensitive attribute "
                    "(image or prompt), with a paired permutation test per attribute.",
        citation="Xiao et al. 2024, GenderBias-VL: Benchmarking Gender Bias in Vision Language Models via "
                 "Counterfactual Probing; Howard et al. 2024, SocialCounterfactuals (CVPR)",
        suites=(_STD, _FULL), section="fairness", page="bias",
        module="probes.counterfactual_bias:CounterfactualBias",
        known_answer="rule models read flip 0 / 1; simulated false-alarm rate and power",
        needs=("logprobs",), metrics=(
            _m("flip_rate", "Flip rate", "Share of counterfactual sets whose chosen answer changes decisively "
               "(each member's winner leads by more than 0.05 probability) when only the attribute changes.",
               "lower", dims=("attribute",), headline=True),
            _m("mean_abs_logprob_gap", "Mean log-probability gap", "Mean over sets of the largest difference in "
               "the target answer's log-probability between members.", "lower", unit="nats", dims=("attribute",)),
            _m("p_value", "p-value (paired permutation test)", "Probability of a difference at least this large if "
               "the attribute made no difference.", unit="p-value", dims=("attribute",)),
            _m("p_value_bh", "p-value, Benjamini-Hochberg adjusted", "p-value adjusted for testing several "
               "attributes (false discovery rate).", unit="p-value", dims=("attribute",)),
            _m("outcome_bias", "Outcome bias (GenderBias-VL)", "How much more often members pick the answer "
               "stereotyped for their own attribute value than for the other value (declared orientation); "
               "positive = stereotype-consistent, 0 = none.", "none", unit="ratio", dims=("attribute",), target=0.0),
            _m("probability_bias", "Probability bias (GenderBias-VL)", "The same with the stereotyped answers' "
               "probabilities, averaged over answer strata; positive = stereotype-consistent.", "none",
               unit="ratio", dims=("attribute",), target=0.0),
            _m("incomplete_sets", "Left-out sets", "Counterfactual sets left out (fewer than two scoreable members, "
               "a missing attribute, one value only); each is named in a finding.", "lower", unit="count"),
        )),
    ProbeSpec(
        name="group_fairness", title="Group fairness", category="fairness",
        description="Accuracy, selection rate and equalized odds per sensitive group and per intersection of two "
                    "attributes (fairlearn MetricFrame), with intervals and permutation tests.",
        citation="Bird et al. 2020, Fairlearn: A toolkit for assessing and improving fairness in AI (Microsoft); "
                 "Hardt et al. 2016, Equality of Opportunity in Supervised Learning (NeurIPS)",
        suites=(_STD, _FULL), section="fairness", page="bias", module="probes.group_fairness:GroupFairness",
        extra="fairness", requires=("fairlearn",),
        known_answer="every value equals fairlearn's functions; simulated false-alarm rate and power",
        metrics=(
            _m("accuracy", "Accuracy per group", "Share of reference answers chosen in each group.", "higher",
               dims=("attribute", "attribute_value", "attribute2", "attribute2_value")),
            _m("selection_rate", "Selection rate per group", "Share of each group given the first listed choice.",
               dims=("attribute", "attribute_value", "attribute2", "attribute2_value")),
            _m("accuracy_difference", "Accuracy difference", "Largest minus smallest group accuracy (interval: "
               "Newcombe's for those two groups, Bonferroni over all pairs).", "lower",
               dims=("attribute", "attribute2"), headline=True),
            _m("accuracy_ratio", "Accuracy ratio", "Smallest over largest group accuracy; 1 = equal.", "higher",
               unit="ratio", dims=("attribute",)),
            _m("demographic_parity_difference", "Demographic parity difference", "Largest minus smallest group "
               "selection rate.", "lower", dims=("attribute",), headline=True),
            _m("demographic_parity_ratio", "Demographic parity ratio", "Smallest over largest selection rate.",
               "higher", unit="ratio", dims=("attribute",)),
            _m("equalized_odds_difference", "Equalized odds difference", "Larger of the true- and false-positive "
               "rate gaps between groups.", "lower", dims=("attribute",)),
            _m("equalized_odds_ratio", "Equalized odds ratio", "Smaller of the true- and false-positive rate "
               "ratios between groups.", "higher", unit="ratio", dims=("attribute",)),
            _m("accuracy_difference_p_value", "p-value of the accuracy difference", "Permutation test of equal groups (labels permuted); small "
               "values mean the difference is unlikely under equal groups.", unit="p-value",
               dims=("attribute", "attribute2")),
            _m("accuracy_difference_p_value_bh", "p-value of the accuracy difference, BH-adjusted", "The p-value adjusted for every "
               "difference, attribute and intersection tested (false discovery rate).", unit="p-value",
               dims=("attribute", "attribute2")),
            _m("demographic_parity_difference_p_value", "p-value of the demographic parity difference", "Permutation test of equal groups (labels permuted); small "
               "values mean the difference is unlikely under equal groups.", unit="p-value",
               dims=("attribute", "attribute2")),
            _m("demographic_parity_difference_p_value_bh", "p-value of the demographic parity difference, BH-adjusted", "The p-value adjusted for every "
               "difference, attribute and intersection tested (false discovery rate).", unit="p-value",
               dims=("attribute", "attribute2")),
            _m("equalized_odds_difference_p_value", "p-value of the equalized odds difference", "Permutation test of equal groups (labels permuted); small "
               "values mean the difference is unlikely under equal groups.", unit="p-value",
               dims=("attribute", "attribute2")),
            _m("equalized_odds_difference_p_value_bh", "p-value of the equalized odds difference, BH-adjusted", "The p-value adjusted for every "
               "difference, attribute and intersection tested (false discovery rate).", unit="p-value",
               dims=("attribute", "attribute2")),
        )),
    ProbeSpec(
        name="retrieval_skew", title="Retrieval skew", category="fairness",
        description="Group skew of image retrieval for neutral text queries over counterfactual image sets "
                    "(MaxSkew@k, MinSkew@k, NDKL).",
        citation="Howard et al. 2024, SocialCounterfactuals: Probing and Mitigating Intersectional Social Biases "
                 "in Vision-Language Models with Counterfactual Examples (CVPR); Geyik et al. 2019, "
                 "Fairness-Aware Ranking in Search & Recommendation Systems (KDD)",
        suites=(_FULL,), section="fairness", page="bias", module="probes.retrieval_skew:RetrievalSkew",
        kinds=("dual_encoder",), black_box="no (dual encoders)",
        known_answer="hand-computed Skew@k and NDKL",
        metrics=(
            _m("max_skew_at_k", "MaxSkew@k", "log of the most over-represented group's share of the top k over "
               "its fair share; 0 = fair.", "lower", unit="ratio", dims=("attribute", "query"), headline=True),
            _m("min_skew_at_k", "MinSkew@k", "log of the most under-represented group's share of the top k over "
               "its fair share; 0 = fair.", "higher", unit="ratio", dims=("attribute", "query")),
            _m("ndkl", "NDKL", "Rank-discounted KL divergence of the ranking's group shares from uniform; 0 = fair.",
               "lower", unit="nats", dims=("attribute", "query")),
            _m("k", "k", "Number of top-ranked images the skew is computed on.", unit="count", dims=("attribute",)),
            _m("p_value", "p-value of MaxSkew@k", "Within-set label permutation test: how likely this skew is if the "
               "attribute did not matter to the ranking.", unit="p-value", dims=("attribute",)),
            _m("p_value_bh", "p-value of MaxSkew@k, BH-adjusted", "The p-value adjusted across attributes.",
               unit="p-value", dims=("attribute",)),
        )),
    ProbeSpec(
        name="hallucination", title="Object hallucination (POPE)", category="safety",
        description="POPE object-presence questions: accuracy, share of 'yes' answers, precision, recall, F1, "
                    "per negative-sampling setting.",
        citation="Li et al. 2023, Evaluating Object Hallucination in Large Vision-Language Models (EMNLP)",
        suites=(_STD, _FULL), section="safety", page="safety", module="probes.hallucination:Hallucination",
        known_answer="POPE's evaluate.py formula per setting (by hand); yes-bias test calibrated at 1%",
        metrics=(
            _m("pope_accuracy", "POPE accuracy", "Share of presence questions answered correctly.", "higher",
               dims=("setting",), headline=True),
            _m("pope_yes_ratio", "Yes ratio", "Share of 'yes' answers; a model without a yes/no bias matches the "
               "true yes share (pope_true_yes_ratio).", dims=("setting",), headline=True),
            _m("pope_true_yes_ratio", "True yes share", "Share of questions whose reference answer is yes: the "
               "yes-ratio of a model without a yes/no bias.", dims=("setting",)),
            _m("pope_precision", "Precision", "Share of 'yes' answers that are right.", "higher", dims=("setting",)),
            _m("pope_recall", "Recall", "Share of present objects answered 'yes'.", "higher", dims=("setting",)),
            _m("pope_f1", "F1", "Harmonic mean of precision and recall.", "higher", dims=("setting",)),
        )),
    ProbeSpec(
        name="typographic_attack", title="Typographic attack", category="safety",
        description="Share of answers that follow text written in the image instead of the visual evidence.",
        citation="Goh et al. 2021, Multimodal Neurons in Artificial Neural Networks (Distill); "
                 "Azuma & Matsui 2023, Defense-Prefix for Preventing Typographic Attacks on CLIP (ICCV workshops)",
        suites=(_STD, _FULL), section="safety", page="safety", module="probes.typographic_attack:TypographicAttack",
        known_answer="a text-reading rule model reads 1",
        metrics=(
            _m("attack_success_rate", "Attack success rate", "Share of answers that follow the word written in "
               "the image over the visual evidence.", "lower", headline=True),
            _m("accuracy", "Accuracy on attacked images", "Share of visual answers still chosen.", "higher"),
            _m("text_not_in_choices", "Examples without the written word as a choice", "Typographic examples "
               "that cannot measure attack success with closed choices.", unit="count"),
        )),
    ProbeSpec(
        name="robustness", title="Robustness to image perturbations", category="safety",
        description="Answer flips and accuracy under Gaussian noise, blur, JPEG compression, occlusion "
                    "(three strengths each) and, for white-box generative models, an L-inf PGD attack.",
        citation="Hendrycks & Dietterich 2019, Benchmarking Neural Network Robustness to Common Corruptions "
                 "and Perturbations (ICLR); Madry et al. 2018, Towards Deep Learning Models Resistant to "
                 "Adversarial Attacks (ICLR)",
        suites=(_FULL,), section="safety", page="safety", module="probes.robustness:Robustness",
        black_box="yes (PGD needs white box)",
        known_answer="deterministic perturbations; PGD lowers the target",
        metrics=(
            _m("flip_rate", "Flip rate", "Share of answers that change under the perturbation.", "lower",
               dims=("perturbation", "strength"), headline=True),
            _m("accuracy", "Accuracy", "Share of reference answers chosen, clean and perturbed.", "higher",
               dims=("perturbation", "strength")),
        )),
    ProbeSpec(
        name="privacy_audit", title="Privacy audit", category="privacy",
        description="Membership inference on canaries (loss threshold): ROC AUC, TPR at 1% FPR, and a one-run "
                    "lower bound on the training run's epsilon, beside the accountant's epsilon for DP models.",
        citation="Steinke, Nasr & Jagielski 2023, Privacy Auditing with One (1) Training Run (NeurIPS); "
                 "Jagielski, Ullman & Oprea 2020, Auditing Differentially Private Machine Learning (NeurIPS); "
                 "Yeom et al. 2018, Privacy Risk in Machine Learning (CSF)",
        suites=(_FULL,), section="privacy", page="privacy", module="probes.privacy_audit:PrivacyAudit",
        known_answer="epsilon lower bound <= accountant epsilon on DP models; the non-private control leaks more",
        needs=("logprobs",), metrics=(
            _m("epsilon_lower_bound", "Empirical epsilon lower bound", "With 95% confidence the training run is "
               "not (epsilon, delta)-DP for any smaller epsilon; 0 = no leakage shown.", "lower", unit="epsilon",
               dims=("variant",), headline=True),
            _m("epsilon_theoretical", "Accountant's epsilon", "The epsilon the DP accountant guarantees.", "lower",
               unit="epsilon", dims=("variant",)),
            _m("mia_auc", "Membership inference AUC", "ROC AUC of telling training canaries from held-out ones; "
               "0.5 = no leakage.", "lower", unit="probability", headline=True, target=0.5),
            _m("tpr_at_1pct_fpr", "TPR at 1% FPR", "Share of members found while flagging at most 1% of "
               "non-members.", "lower", unit="probability"),
            _m("delta", "delta", "The delta the epsilon values refer to.", unit="probability", dims=("variant",)),
        )),
)

CATALOG: dict[str, ProbeSpec] = {s.name: s for s in _BUILTIN}
_EXTRA: dict[str, ProbeSpec] = {}  # specs of plugin probes, added by probes.base when they load

# Suites in catalog order; a plugin probe may declare any of these suites.
SUITES: dict[str, tuple[str, ...]] = {
    suite: tuple(s.name for s in _BUILTIN if suite in s.suites) for suite in (_QUICK, _STD, _FULL)
}


def register_spec(spec: ProbeSpec) -> None:
    """Add a plugin probe's spec (a built-in name cannot be replaced)."""
    if spec.name in CATALOG and CATALOG[spec.name] is not spec:
        raise ValueError(f"a probe named {spec.name!r} is already in the catalog")
    if spec.name not in CATALOG:
        _EXTRA[spec.name] = spec


def all_specs() -> dict[str, ProbeSpec]:
    return {**CATALOG, **_EXTRA}


def spec_of(probe: str) -> ProbeSpec | None:
    return CATALOG.get(probe) or _EXTRA.get(probe)


def suite_probes(suite: str) -> tuple[str, ...]:
    """Built-in members of `suite`, then plugin probes that declare it."""
    if suite not in SUITES:
        raise KeyError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
    return SUITES[suite] + tuple(n for n, s in _EXTRA.items() if suite in s.suites)


def metric_spec(probe: str, metric: str) -> MetricSpec | None:
    spec = spec_of(probe)
    return spec.metric(metric) if spec else None


def direction(probe: str, metric: str) -> int:
    """+1 higher is better, -1 lower is better, 0 no agreed direction (or unknown metric)."""
    m = metric_spec(probe, metric)
    return {"higher": 1, "lower": -1}.get(m.direction, 0) if m else 0


def markdown_table() -> str:
    """The README's probe table (tests/test_catalog.py keeps the README equal to it)."""
    lines = ["| probe | category | main metrics | suites | black box | install | known-answer test |",
             "|---|---|---|---|---|---|---|"]
    for spec in _BUILTIN:
        main = ", ".join(f"`{m.name}`" for m in spec.metrics if m.headline) or ", ".join(
            f"`{m.name}`" for m in spec.metrics[:2])
        needs = f"`mmaudit[{spec.extra}]`" if spec.extra else "core"
        lines.append(f"| `{spec.name}` | {spec.category} | {main} | {', '.join(spec.suites) or '-'} | "
                     f"{spec.black_box} | {needs} | {spec.known_answer} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m audit.catalog  -> the README probe table
    print(markdown_table())
