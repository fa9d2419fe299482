"""Reads a TensorBoard log folder the way TensorBoard does and prints what it found, as JSON.

Usage: tb_read.py LOGDIR

- "records": per event file (path relative to LOGDIR), the number of TFRecords, read with
  TensorBoard's own record reader, which checks both masked CRC-32Cs of every record (the event
  loaders swallow a bad CRC as a truncated file, so it is checked here on its own).
- "runs": per run folder (relative to LOGDIR, "." = LOGDIR), through `EventAccumulator`
  (size_guidance 0 = keep everything): scalars {tag: [[step, value], ...]}, text tensors
  {tag: [[step, text], ...]}, and the hparams plugin's raw content decoded with
  `plugin_data_pb2` (experiment / session_start_info / session_end_info).
- "experiment" and "session_groups": what the HParams dashboard gets from its backend
  (`get_experiment` and `list_session_groups` over a `MultiplexerDataProvider`), i.e. the
  experiment's hparam/metric definitions and every trial with its hparams, status and metrics.
"""
import json
import os
import sys

from google.protobuf import json_format
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, event_accumulator
from tensorboard.backend.event_processing import plugin_event_multiplexer
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
from tensorboard.compat.tensorflow_stub.errors import OutOfRangeError
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment
from tensorboard.plugins.hparams import list_session_groups, metadata, plugin_data_pb2
from tensorboard.util import tensor_util

logdir = sys.argv[1]


def to_json(msg):
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def count_records(path):
    reader = pywrap_tensorflow.PyRecordReader_New(path)
    n = 0
    while True:
        try:
            reader.GetNext()  # raises DataLossError on a bad CRC
        except OutOfRangeError:
            return n
        n += 1


records = {}
run_dirs = []
for root, _dirs, files in sorted(os.walk(logdir)):
    events = sorted(f for f in files if "tfevents" in f)
    if events:
        run_dirs.append(root)
    for f in events:
        records[os.path.relpath(os.path.join(root, f), logdir)] = count_records(
            os.path.join(root, f)
        )

runs = {}
for root in run_dirs:
    acc = event_accumulator.EventAccumulator(
        root,
        size_guidance={
            event_accumulator.COMPRESSED_HISTOGRAMS: 0,
            event_accumulator.IMAGES: 0,
            event_accumulator.AUDIO: 0,
            event_accumulator.SCALARS: 0,
            event_accumulator.HISTOGRAMS: 0,
            event_accumulator.TENSORS: 0,
        },
    )
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]}
    texts, hparams = {}, {}
    for tag in tags["tensors"]:
        meta = acc.SummaryMetadata(tag)
        plugin = meta.plugin_data.plugin_name
        if plugin == "text":
            texts[tag] = [
                [e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode("utf-8")]
                for e in acc.Tensors(tag)
            ]
        elif plugin == metadata.PLUGIN_NAME:
            data = plugin_data_pb2.HParamsPluginData.FromString(meta.plugin_data.content)
            hparams[tag] = to_json(data)
            hparams[tag]["_events"] = len(acc.Tensors(tag))
    runs[os.path.relpath(root, logdir)] = {
        "scalars": scalars,
        "text": texts,
        "hparams": hparams,
    }

# The HParams dashboard's backend, without a server.
multiplexer = plugin_event_multiplexer.EventMultiplexer()
multiplexer.AddRunsFromDirectory(logdir)
multiplexer.Reload()
provider = data_provider.MultiplexerDataProvider(multiplexer, logdir)
tb_context = base_plugin.TBContext(
    logdir=logdir, multiplexer=multiplexer, data_provider=provider
)
hp_context = backend_context.Context(tb_context)
ctx = context.RequestContext()
experiment = get_experiment.Handler(
    ctx, hp_context, "", api_pb2.GetExperimentRequest()
).run()
groups = list_session_groups.Handler(
    ctx,
    hp_context,
    "",
    # The dashboard asks for every status (a session is listed only if its status is allowed).
    api_pb2.ListSessionGroupsRequest(
        start_index=0,
        slice_size=1000,
        allowed_statuses=[
            api_pb2.STATUS_UNKNOWN,
            api_pb2.STATUS_SUCCESS,
            api_pb2.STATUS_FAILURE,
            api_pb2.STATUS_RUNNING,
        ],
    ),
).run()

print(
    json.dumps(
        {
            "records": records,
            "runs": runs,
            "experiment": to_json(experiment),
            "session_groups": to_json(groups),
        },
        indent=1,
        sort_keys=True,
    )
)
