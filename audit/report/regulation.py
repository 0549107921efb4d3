"""Which documentation duty each report section serves.

Mapping of report sections to the EU AI Act (Regulation (EU) 2024/1689: Art. 10 data and
data governance, Art. 13 transparency, Art. 15 accuracy, robustness and cybersecurity,
Annex IV technical documentation, Art. 55 general-purpose models with systemic risk), the
NIST AI RMF 1.0 MEASURE 2.x subcategories, and the Model Card sections of Mitchell et al.
(2019). It says where the evidence belongs; it is not a legal assessment of compliance.
"""
from __future__ import annotations

__all__ = ["MAPPING", "REFERENCES", "FRAMEWORKS", "references_for", "mapping_table"]

FRAMEWORKS = {"eu_ai_act": "EU AI Act", "nist_ai_rmf": "NIST AI RMF", "model_card": "Model Card"}

# Short descriptions of every reference used below (shown in the mapping table).
REFERENCES = {
    "Art. 10(2)(f)": "examination of training/validation/test data for possible biases",
    "Art. 10(2)(g)": "measures to detect, prevent and mitigate the biases found",
    "Art. 10(3)": "data relevant, representative, as free of errors and complete as possible",
    "Art. 10(5)": "processing of special categories of data strictly for bias detection and correction",
    "Art. 13(3)(a)": "identity and contact details of the provider",
    "Art. 13(3)(b)(i)": "intended purpose",
    "Art. 13(3)(b)(ii)": "declared level of accuracy, robustness and cybersecurity and its metrics",
    "Art. 13(3)(b)(iii)": "known or foreseeable circumstances that may lead to risks",
    "Art. 13(3)(b)(iv)": "technical capabilities to explain the output",
    "Art. 13(3)(b)(v)": "performance regarding specific persons or groups",
    "Art. 13(3)(b)(vi)": "specifications for the input data",
    "Art. 15(1)": "appropriate level of accuracy, robustness and cybersecurity",
    "Art. 15(3)": "accuracy levels and relevant metrics declared",
    "Art. 15(4)": "resilience to errors, faults and inconsistencies",
    "Art. 15(5)": "resilience to adversarial examples, data poisoning and confidentiality attacks",
    "Annex IV(1)": "general description: intended purpose, provider, versions",
    "Annex IV(2)(b)": "design specifications, key design choices",
    "Annex IV(2)(c)": "system architecture and components",
    "Annex IV(2)(d)": "data requirements, datasheets, provenance, labelling, cleaning",
    "Annex IV(2)(g)": "validation and testing: metrics, test logs, dated reports",
    "Annex IV(2)(h)": "cybersecurity measures",
    "Annex IV(3)": "capabilities and limitations, accuracy for specific groups, foreseeable unintended outcomes",
    "Annex IV(4)": "appropriateness of the performance metrics",
    "Annex IV(6)": "relevant changes made through the lifecycle",
    "Art. 55(1)(a)": "state-of-the-art model evaluation including documented adversarial testing",
    "Art. 55(1)(b)": "assess and mitigate possible systemic risks",
    "Art. 55(1)(d)": "adequate cybersecurity protection of the model",
    "MEASURE 2.1": "test sets, metrics and TEVV tools documented",
    "MEASURE 2.3": "performance measured for conditions similar to deployment",
    "MEASURE 2.5": "validity and reliability demonstrated; limits of generalisation documented",
    "MEASURE 2.6": "safety risks evaluated; residual risk within tolerance",
    "MEASURE 2.7": "security and resilience evaluated and documented",
    "MEASURE 2.8": "transparency and accountability risks examined",
    "MEASURE 2.9": "model explained, validated and documented; output interpreted in context",
    "MEASURE 2.10": "privacy risk examined and documented",
    "MEASURE 2.11": "fairness and bias evaluated and documented",
    "MEASURE 2.13": "effectiveness of the TEVV metrics and processes evaluated",
}

MAPPING: dict[str, dict[str, tuple[str, ...]]] = {
    "identity": {"eu_ai_act": ("Art. 13(3)(a)", "Art. 13(3)(b)(i)", "Annex IV(1)"),
                 "nist_ai_rmf": ("MEASURE 2.8",),
                 "model_card": ("Model Details", "Intended Use")},
    "architecture": {"eu_ai_act": ("Annex IV(2)(b)", "Annex IV(2)(c)", "Art. 13(3)(b)(vi)"),
                     "nist_ai_rmf": ("MEASURE 2.8",),
                     "model_card": ("Model Details",)},
    "data": {"eu_ai_act": ("Art. 10(2)(f)", "Art. 10(3)", "Art. 10(5)", "Annex IV(2)(d)"),
             "nist_ai_rmf": ("MEASURE 2.1", "MEASURE 2.11"),
             "model_card": ("Evaluation Data", "Training Data", "Factors")},
    "protocol": {"eu_ai_act": ("Art. 15(3)", "Annex IV(2)(g)", "Annex IV(4)", "Art. 55(1)(a)"),
                 "nist_ai_rmf": ("MEASURE 2.1", "MEASURE 2.13"),
                 "model_card": ("Metrics", "Evaluation Data")},
    "fairness": {"eu_ai_act": ("Art. 10(2)(f)", "Art. 13(3)(b)(v)", "Annex IV(3)"),
                 "nist_ai_rmf": ("MEASURE 2.11",),
                 "model_card": ("Quantitative Analyses", "Factors")},
    "safety": {"eu_ai_act": ("Art. 15(1)", "Art. 15(3)", "Art. 15(4)", "Art. 15(5)", "Art. 13(3)(b)(ii)",
                             "Art. 55(1)(a)"),
               "nist_ai_rmf": ("MEASURE 2.3", "MEASURE 2.5", "MEASURE 2.6", "MEASURE 2.7"),
               "model_card": ("Quantitative Analyses", "Metrics")},
    "interpretability": {"eu_ai_act": ("Art. 13(3)(b)(iv)", "Annex IV(2)(b)"),
                         "nist_ai_rmf": ("MEASURE 2.9",),
                         "model_card": ("Quantitative Analyses",)},
    "mitigations": {"eu_ai_act": ("Art. 10(2)(g)", "Annex IV(6)", "Art. 55(1)(b)"),
                    "nist_ai_rmf": ("MEASURE 2.6", "MEASURE 2.11"),
                    "model_card": ("Ethical Considerations", "Caveats and Recommendations")},
    "privacy": {"eu_ai_act": ("Art. 15(5)", "Art. 10(5)", "Annex IV(2)(h)", "Art. 55(1)(d)"),
                "nist_ai_rmf": ("MEASURE 2.10", "MEASURE 2.7"),
                "model_card": ("Ethical Considerations",)},
    "targets": {"eu_ai_act": ("Art. 15(3)", "Annex IV(2)(g)", "Annex IV(4)"),
                "nist_ai_rmf": ("MEASURE 2.3", "MEASURE 2.6", "MEASURE 2.13"),
                "model_card": ("Metrics", "Quantitative Analyses")},
    "limitations": {"eu_ai_act": ("Art. 13(3)(b)(iii)", "Annex IV(3)"),
                    "nist_ai_rmf": ("MEASURE 2.5", "MEASURE 2.8"),
                    "model_card": ("Caveats and Recommendations", "Ethical Considerations")},
    "manifest": {"eu_ai_act": ("Annex IV(2)(g)", "Annex IV(6)"),
                 "nist_ai_rmf": ("MEASURE 2.1", "MEASURE 2.8"),
                 "model_card": ("Model Details",)},
}


def references_for(section_id: str) -> dict[str, list[str]]:
    return {k: list(v) for k, v in MAPPING.get(section_id, {}).items()}


def mapping_table(titles: dict[str, str]) -> tuple[list[str], list[list[str]]]:
    """(columns, rows): one row per report section, one column per framework."""
    columns = ["report section", *FRAMEWORKS.values()]
    rows = [[titles.get(sid, sid), *("; ".join(MAPPING[sid].get(k, ())) for k in FRAMEWORKS)]
            for sid in MAPPING if sid in titles]
    return columns, rows


def reference_glossary() -> tuple[list[str], list[list[str]]]:
    used = sorted({r for m in MAPPING.values() for refs in m.values() for r in refs if r in REFERENCES},
                  key=lambda r: (not r.startswith("Art"), r))
    return ["reference", "what it asks for"], [[r, REFERENCES[r]] for r in used]
