"""Benchmark loading: the shared benchmark files, the question/reference shown to model and judge, the task configs,
hub-row mapping (no network), and one-line errors for bad input."""

import json

import pytest
from hydra import compose, initialize_config_dir

from medix.config import register_configs
from medix.errors import ConfigError, DataError
from medix.eval.hub import hub_record, row_selected
from medix.eval.items import read_jsonl_records, to_item
from medix.eval.tasks import load_task, local_task_name, task_specs

register_configs()  # the schemas conf/'s groups start with, as the entry points register them

PAPER_TEXT = ["mmlu_anatomy", "mmlu_clinical_knowledge", "mmlu_college_biology", "mmlu_college_medicine",
              "mmlu_medical_genetics", "mmlu_professional_medicine", "medmcqa", "medqa", "usmle_sa", "pubmedqa",
              "mimic_cxr_summarization"]
PAPER_VISION = ["slake", "vqa_rad", "pathvqa", "pmc_vqa", "pmc_vqa_hard", "mimic_cxr_report_generation"]


def eval_cfg(repo_root, *overrides):
    with initialize_config_dir(config_dir=str(repo_root / "conf"), version_base="1.3"):
        return compose("eval", overrides=list(overrides))


def test_medqa_items_show_lettered_choices_and_judge_against_letter_plus_text(shared_benchmarks):
    [record] = read_jsonl_records(shared_benchmarks / "medqa" / "test.jsonl", limit=1)
    item = to_item(record, "medqa")
    label = record["answer_label"]
    assert item.reference == f"{label}. {record['answer']}"
    assert item.question.startswith(record["question"])
    lines = item.question.split("\n\nChoices:\n")[1].split("\n")
    assert lines == [f"{letter}. {text}" for letter, text in zip("ABCD", record["choices"])]


def test_pubmedqa_items_put_contexts_before_the_question_and_judge_against_decision_and_long_answer(shared_benchmarks):
    [record] = read_jsonl_records(shared_benchmarks / "pubmedqa" / "test.jsonl", limit=1)
    item = to_item(record, "pubmedqa")
    assert item.question.startswith("Contexts:\n" + record["contexts"][0])
    assert f"\n\nQuestion:\n{record['question']}\n\nChoices:\nA. yes\nB. no\nC. maybe" in item.question
    assert item.reference == f"{record['answer']}\n{record['long_answer']}"


def test_vqa_rad_images_resolve_to_existing_files_and_open_questions_have_plain_references(shared_benchmarks):
    records = read_jsonl_records(shared_benchmarks / "vqa_rad" / "test.jsonl", limit=5)
    assert len(records) == 5
    for record in records:
        item = to_item(record, "vqa_rad")
        assert (shared_benchmarks / "vqa_rad" / "images").samefile(__import__("pathlib").Path(item.image).parent)
        assert item.reference == record["answer"] and item.question == record["question"]


def test_limit_reads_only_the_first_items(shared_benchmarks):
    records = read_jsonl_records(shared_benchmarks / "mmlu_anatomy" / "test.jsonl", limit=3)
    first3 = [json.loads(l)["id"] for l in open(shared_benchmarks / "mmlu_anatomy" / "test.jsonl")][:3]
    assert [r["id"] for r in records] == first3


@pytest.mark.parametrize("content, message", [
    ('{"id": "a", "question": "q?", "answer": "x"}\nnot json\n', ":2: not valid JSON"),
    ('{"id": "a", "question": "", "answer": "x"}\n', ":1: field 'question' must be a non-empty string"),
    ('{"id": "a", "question": "q", "answer": "x", "choices": ["x", "y"], "answer_label": "C"}\n',
     ":1: field 'answer_label' must be one of ['A', 'B']"),
    ('{"id": "a", "question": "q", "answer": "x", "choices": ["x", "y"], "answer_label": "B"}\n',
     ":1: field 'answer_label'='B' names option 'y', but 'answer' is 'x'"),
    ('{"id": "a", "question": "q", "answer": "x"}\n{"id": "a", "question": "q", "answer": "y"}\n',
     ":2: field 'id' 'a' appears twice"),
    ('{"id": "a", "question": "q", "answer": "x", "image": "images/none.jpg"}\n', ":1: field 'image' 'images/none.jpg' not found"),
    ('[1, 2]\n', ":1: expected a JSON object"),
    ("\n\n", "has no items"),
])
def test_bad_benchmark_files_name_the_line_and_field(tmp_path, content, message):
    path = tmp_path / "bench.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=None) as err:
        read_jsonl_records(path)
    assert message in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl_records(tmp_path / "nope.jsonl")


def test_a_missing_answer_label_is_derived_from_the_answer_text(tmp_path):
    path = tmp_path / "mcq.jsonl"
    path.write_text('{"id": 1, "question": "q", "answer": "y", "choices": ["x", "y", "z"]}\n')
    [record] = read_jsonl_records(path)
    assert to_item(record, "t").reference == "B. y"


def test_groups_and_single_tasks_share_one_shape(repo_root):
    all_cfg = eval_cfg(repo_root, "benchmark=all")
    assert list(all_cfg.benchmark.tasks) == PAPER_TEXT + PAPER_VISION
    assert list(eval_cfg(repo_root, "benchmark=text").benchmark.tasks) == PAPER_TEXT
    assert list(eval_cfg(repo_root, "benchmark=vision").benchmark.tasks) == PAPER_VISION
    single = eval_cfg(repo_root, "benchmark=medqa", "benchmark.limit=2").benchmark
    assert list(single.tasks) == ["medqa"] and single.limit == 2
    specs = {s.name: s for s in task_specs(all_cfg.benchmark)}
    assert {n for n, s in specs.items() if s.modality == "vision"} == set(PAPER_VISION)
    assert {n for n, s in specs.items() if s.scoring == "rubric"} == {"mimic_cxr_summarization",
                                                                      "mimic_cxr_report_generation"}
    assert all(s.hub and s.hub["path"] and s.fields for s in specs.values())


def test_data_dir_reads_each_task_from_its_shared_folder_and_missing_tasks_error_or_skip(repo_root, shared_benchmarks):
    bench = eval_cfg(repo_root, "benchmark=all", f"benchmark.data_dir={shared_benchmarks}", "benchmark.limit=2",
                     "benchmark.missing=skip").benchmark
    loaded = {s.name: load_task(s, bench) for s in task_specs(bench)}
    present = {n for n, v in loaded.items() if v is not None}
    assert present == {"mmlu_anatomy", "mmlu_clinical_knowledge", "mmlu_college_biology", "mmlu_college_medicine",
                       "mmlu_medical_genetics", "mmlu_professional_medicine", "medmcqa", "medqa", "pubmedqa",
                       "slake", "vqa_rad", "pathvqa"}
    items, modality = loaded["slake"]
    assert len(items) == 2 and modality == "vision" and items[0].image is None  # SLAKE copy has no images
    assert loaded["medqa"][1] == "text"
    strict = eval_cfg(repo_root, "benchmark=usmle_sa", f"benchmark.data_dir={shared_benchmarks}").benchmark
    with pytest.raises(DataError, match="no local folder for usmle_sa"):
        load_task(task_specs(strict)[0], strict)


def test_local_benchmark_needs_a_path_and_names_the_task_after_its_folder(repo_root, shared_benchmarks):
    with pytest.raises(ConfigError, match="benchmark.path"):
        task_specs(eval_cfg(repo_root).benchmark)
    bench = eval_cfg(repo_root, f"benchmark.path={shared_benchmarks / 'vqa_rad' / 'test.jsonl'}",
                     "benchmark.limit=3").benchmark
    [spec] = task_specs(bench)
    items, modality = load_task(spec, bench)
    assert spec.name == "vqa_rad" and modality == "vision" and len(items) == 3
    assert local_task_name("/x/my_set.jsonl") == "my_set"
    named = eval_cfg(repo_root, f"benchmark.path={shared_benchmarks / 'medqa' / 'test.jsonl'}",
                     "benchmark.name=usmle4").benchmark
    assert task_specs(named)[0].name == "usmle4"
    assert load_task(task_specs(named)[0], named)[1] == "text"


def test_hub_rows_map_to_the_same_schema_as_local_files(repo_root):
    specs = {s.name: s for s in task_specs(eval_cfg(repo_root, "benchmark=all").benchmark)}
    medqa_row = {"sent1": "Which?", "ending0": "a", "ending1": "b", "ending2": "c", "ending3": "d", "label": 2}
    record = hub_record(medqa_row, specs["medqa"].fields, "medqa", 7)
    assert to_item(record, "medqa").reference == "C. c" and record["id"] == "medqa-7"
    mmlu_row = {"question": "Q", "choices": ["w", "x", "y", "z"], "answer": 0}
    assert to_item(hub_record(mmlu_row, specs["mmlu_anatomy"].fields, "m", 0), "m").reference == "A. w"
    medmcqa_row = {"question": "Q", "opa": "p", "opb": "q", "opc": "r", "opd": "s", "cop": 3}
    assert to_item(hub_record(medmcqa_row, specs["medmcqa"].fields, "m", 0), "m").reference == "D. s"
    pubmed_row = {"QUESTION": "Does it?", "CONTEXTS": ["c1", "c2"], "final_decision": "no", "LONG_ANSWER": "Because."}
    item = to_item(hub_record(pubmed_row, specs["pubmedqa"].fields, "p", 0), "p")
    assert item.reference == "no\nBecause." and item.question.startswith("Contexts:\nc1\nc2\n\nQuestion:\nDoes it?")
    summary = hub_record({"report": "Lungs clear.", "summary": "Normal."}, specs["mimic_cxr_summarization"].fields, "s", 0)
    assert summary["question"] == "Write a short summary of the following report.\n\nReport:\nLungs clear.:"
    assert row_selected({"q_lang": "en"}, specs["slake"].filter) and not row_selected({"q_lang": "zh"}, specs["slake"].filter)
    with pytest.raises(DataError, match="hub column 'sent1' is missing"):
        hub_record({"question": "x"}, specs["medqa"].fields, "medqa", 3)
