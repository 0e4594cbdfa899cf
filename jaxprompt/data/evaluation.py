"""Exact task metrics from generated texts, in the order `get_dataset` yields eval batches.

`get_dataset(name, lengths, split, shuffle=False, num_epochs=1)` and `eval_examples(name,
split)` walk the same examples in the same order; keep the rows where `example_mask` is 1,
decode the predictions and call `compute_metrics`.

Example:
  >>> examples = eval_examples('jaxprompt_glue_rte', 'validation')
  >>> compute_metrics('jaxprompt_glue_rte', examples, ['entailment', ...])
  {'accuracy': 71.2}
"""

from typing import Any, Mapping, Optional, Sequence

import seqio

from jaxprompt.data.features import traced_as_written

Example = Mapping[str, Any]


@traced_as_written
def eval_examples(task_name: str, split: str = 'validation', *, shard_id: int = 0,
                  num_shards: int = 1, try_in_mem_cache: bool = True) -> list[dict[str, Any]]:
  """The preprocessed examples of a task (numpy; with `targets_pretokenized`), eval order."""
  task = seqio.get_mixture_or_task(task_name)
  if not isinstance(task, seqio.Task):
    raise ValueError(f'{task_name} is a mixture; evaluate each of its tasks on its own.')
  shard_info = seqio.ShardInfo(shard_id, num_shards) if num_shards > 1 else None
  dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1,
                             shard_info=shard_info, try_in_mem_cache=try_in_mem_cache)
  return list(dataset.as_numpy_iterator())


def postprocessed_targets(task: seqio.Task, examples: Sequence[Example]) -> list[Any]:
  """What the metrics compare predictions against (class ids, answer lists, floats ...)."""
  postprocess = task.postprocess_fn or (lambda x, **_: x)
  return [postprocess(ex['targets_pretokenized'], example=ex, is_target=True) for ex in examples]


def compute_metrics(task_name: str, examples: Sequence[Example],
                    predictions: Sequence[str],
                    task: Optional[seqio.Task] = None) -> dict[str, float]:
  """Runs the task's metric functions on its postprocessed targets and predictions.

  Args:
    task_name: a registered seqio task.
    examples: from `eval_examples`, one per prediction, in the same order.
    predictions: the decoded generations.
    task: the task object, when it is not (or no longer) registered under `task_name`.

  Returns:
    {metric name: value in percent}.
  """
  task = task or seqio.get_mixture_or_task(task_name)
  if len(examples) != len(predictions):
    raise ValueError(f'{task_name}: {len(examples)} examples but {len(predictions)} '
                     'predictions; drop the padding rows (example_mask == 0) first.')
  postprocess = task.postprocess_fn or (lambda x, **_: x)
  targets = postprocessed_targets(task, examples)
  outputs = [postprocess(p, example=ex, is_target=False) for p, ex in zip(predictions, examples)]
  results = {}
  for metric_fn in task.predict_metric_fns:
    results.update(metric_fn(targets, outputs))
  return results
