"""Standard VLM benchmarks read from their released files, their metrics, and answering with resume.

    python -m qwenvl_lab.evaluation --model RUN_DIR --task vqav2 --data DIR --images DIR --output OUT
    python -m qwenvl_lab.evaluation.to_vqav2 val.jsonl --out DIR          # our JSONL -> a VQAv2 questions/annotations pair
    python -m qwenvl_lab.evaluation.lmms_eval --model qwenvl_lab --model_args pretrained=RUN_DIR --tasks TASK ...

Modules: `normalize` (the VQA answer normalisation), `metrics` (stable metric functions), `items`
(`EvalItem`), `tasks/` (one loader + scorer per benchmark, registry `TASKS`), `likelihood` (option
log-likelihoods), `runner` (`run_task`: batched, resumable answering and scoring), `report` (table, chart),
`to_vqav2`, `lmms_model` / `lmms_eval` (the lmms-eval model class and its launcher).
"""

if not __package__.startswith("qwenvl_lab."):  # the old spelling: `python -m evaluation...` from the checkout
    from qwenvl_lab._moved import refuse  # (absolute: this is not qwenvl_lab.*)

    refuse(__package__)
