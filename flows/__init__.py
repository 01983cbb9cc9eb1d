from alignflow.flows.gem import gem, gem_summary_markdown
from alignflow.flows.genies_eval import genies_eval, genies_summary_markdown
from alignflow.flows.pipeline import pipeline, pipeline_summary_markdown
from alignflow.flows.report import summary_markdown
from alignflow.flows.self_improve import self_improve

FLOWS = {"self-improve": self_improve, "genies-eval": genies_eval, "gem": gem, "pipeline": pipeline}
# how the CLI prints each flow's returned summary
SUMMARIES = {"self-improve": lambda s: summary_markdown("self-improve", s), "genies-eval": genies_summary_markdown,
             "gem": gem_summary_markdown, "pipeline": pipeline_summary_markdown}
