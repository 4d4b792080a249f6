"""Export a trained model for deployment: ONNX, TorchScript or a plain state dict.

Formats (`export_model(model, metadata, fmt, output)`):
  onnx         torch.onnx.export with the dynamo exporter (torch.export + onnxscript), opset 18 unless
               asked otherwise, a dynamic batch axis; runs with onnxruntime alone.
  torchscript  torch.jit.trace; loads with `torch.jit.load` and nothing of ours installed.
  state_dict   the weights as a plain dict of tensors with torchvision's names (`torch.save`, or
               safetensors when the file name ends in .safetensors); never includes preprocessing.

ONNX and TorchScript exports include the preprocessing by default (`WithPreprocessing`): the graph
takes uint8 RGB images (N, S, S, 3) and returns float32 logits (N, classes), so a deployer needs no
mean or std. S is the size training stored its images at: image_size, or 32 for CIFAR trained at
another size, with the resize to image_size (bilinear, as training did it on the device) inside the
graph. Every export carries `ExportMetadata` (classes, image size, mean/std, architecture, ...) as
one JSON string under the key "resnet_train": in the ONNX model's metadata_props, in the TorchScript
archive's extra files, and for state dicts in `<file>.metadata.json` beside the weights (and in the
safetensors header).

What a state dict means outside resnet-train (`torchvision_compatibility`, also in the metadata):
  resnet18..152, imagenet stem  loads into torchvision.models.resnetNN(num_classes=K), strict.
  resnet18..152, cifar stem     the same names, but torchvision's model needs
                                conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False), maxpool = nn.Identity().
  resnet20..110                 not a torchvision architecture (widths 16/32/64, parameter-free
                                option-A shortcuts): build it with resnet_train.models.

`parity_check` runs the exported file (onnxruntime, torch.jit.load, or a fresh model loading the
state dict) and the PyTorch model on the same images and raises `ParityError` beyond 1e-4 on any
logit. `load_exported` opens an exported file for prediction.

Modules: `metadata` (what a file says about itself), `preprocessing` (training's preprocessing as a
module), `formats` (writing each format), `loading` (opening one to predict), `parity` (checking it).
"""

from .formats import DEFAULT_OPSET, FORMATS, MIN_OPSET, check_format, check_installed, export_model
from .loading import ExportedModel, format_of, load_exported, read_state_dict
from .metadata import (METADATA_KEY, ExportMetadata, metadata_of, metadata_path, parity_report_path,
                       torchvision_compatibility, torchvision_model)
from .parity import DEFAULT_ATOL, ParityError, ParityReport, compare_logits, parity_check, random_images
from .preprocessing import WithPreprocessing, preprocess

__all__ = ["DEFAULT_ATOL", "DEFAULT_OPSET", "FORMATS", "METADATA_KEY", "MIN_OPSET", "ExportMetadata", "ExportedModel",
           "ParityError", "ParityReport", "WithPreprocessing", "check_format", "check_installed", "compare_logits", "export_model",
           "format_of", "load_exported", "metadata_of", "metadata_path", "parity_check", "parity_report_path",
           "preprocess", "random_images", "read_state_dict", "torchvision_compatibility", "torchvision_model"]
