"""Write VQA-RAD's items (../shared/benchmarks/vqa_rad/test.jsonl) that have an image, an answer and a modality as a
training set in medix's schema (id, image, problem, solution = "<TAG> answer"): the images of the CPU recipe run.

    python experiments/vllm_recipe/vqa_rad_train.py ../shared/benchmarks/vqa_rad/test.jsonl vqa_rad_train.jsonl
"""

import json
import sys
from pathlib import Path


def training_rows(benchmark: Path) -> list[dict]:
    rows = []
    for line in benchmark.read_text().splitlines():
        item = json.loads(line)
        if item.get("image") and item.get("answer") and item.get("modality"):
            rows.append({"id": item["id"], "image": str((benchmark.parent / item["image"]).resolve()),
                         "problem": item["question"], "solution": f"<{item['modality']}> {item['answer']}",
                         "source": "vqa_rad"})
    return rows


if __name__ == "__main__":
    source, target = Path(sys.argv[1]), Path(sys.argv[2])
    rows = training_rows(source)
    target.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{len(rows)} rows with images -> {target}")
