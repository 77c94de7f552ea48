"""post-stats in Python, the same formula as taskmill's built-in task, for the peer benchmarks."""


def post_stats(records):
    count = title_chars = max_body = 0
    entropy_sum = 0.0
    for r in records:
        title, body = r.get("title"), r.get("body")
        if not isinstance(title, str) or not isinstance(body, str):
            continue
        title = title.strip()
        n = len(title)
        count += 1
        title_chars += n
        max_body = max(max_body, len(body))
        entropy_sum += len(set(title.lower())) / n if n else 0.0
    mean = (lambda x: x / count) if count else (lambda x: 0.0)
    return {
        "avg_title_length": mean(title_chars),
        "max_body_length": max_body,
        "title_entropy": mean(entropy_sum),
        "processed_count": count,
    }


def batches(path, size):
    import json

    batch = []
    with open(path) as f:
        for line in f:
            batch.append(json.loads(line))
            if len(batch) == size:
                yield batch
                batch = []
    if batch:
        yield batch
