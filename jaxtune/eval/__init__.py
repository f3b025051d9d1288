"""Evaluation: perplexity, generation and classification metrics, intervals, reports.

Why a package of its own: a tuned model is judged by the libraries everyone trusts
(sacrebleu, rouge-score, scikit-learn), on examples rendered exactly as training renders
them, with bootstrap intervals and a base-vs-tuned comparison; `launch/eval.py` is the
command line over it, and the training loop reuses its pieces (`perplexity.row_stats`,
`perplexity.kl_sums`, `plots.loss_png`, `model_card.write`).

Modules (heavy imports, sacrebleu / sklearn / matplotlib / lm_eval, happen inside
functions, so importing this package is cheap):

  examples       eval data -> Examples (text / generate / classify), as training renders it
  perplexity     token NLL sums through models/head.py, jitted and sharded; KL to a base
  runner         one model over the examples: scores, label scores, generations
  text           sacrebleu BLEU / chrF (+ signatures), rouge-score ROUGE, exact match
  classify       label prediction by score or generation; scikit-learn metrics
  bootstrap      95% bootstrap intervals, paired bootstrap p-values (sacrebleu's test)
  summary        outputs -> metrics.json values, intervals, p-values, changed examples
  report, plots  the output directory: JSON, predictions.jsonl, report.md, PNG charts
  load           models (weights.load only) and tokenizers for evaluation
  model_card     README.md model card for an HF export
  lm_eval_model  the `jaxtune` model class for lm-evaluation-harness (optional extra)
"""
