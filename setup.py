import glob

from setuptools import find_packages, setup

setup(
    name="mindone-qwen2vl",
    version="0.1.0",
    description="Qwen2-VL (2B/7B/72B Instruct) for MindSpore on Ascend, exact against Hugging Face transformers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=find_packages(include=["mindone_qwen2vl", "mindone_qwen2vl.*"]),
    include_package_data=True,
    package_data={"mindone_qwen2vl": ["assets/*", "assets/*/*", "csrc/*.cc", "csrc/*.h"]},
    # The presets live at the top of the repo; an installed package finds them under <prefix>/share.
    data_files=[("share/mindone_qwen2vl/configs", sorted(glob.glob("configs/*.yaml")))],
    install_requires=[
        "mindspore>=2.5",  # 2.10.0 is the tested version
        "numpy<2",  # MindSpore fails at its first op with numpy 2
        # The tested version: transformers 5 needs torchvision in the image processor, which is not
        # installable here, and processor details shift between releases.
        "transformers==4.57.1",
        "tokenizers",
        "jinja2",  # chat templates; transformers does not require it and torch (which brings it) is optional
        "pillow",
        # decord ships wheels for x86-64 only; elsewhere (aarch64 Ascend hosts) PyAV decodes.
        "decord; platform_machine == 'x86_64' or platform_machine == 'AMD64'",
        "av; platform_machine != 'x86_64' and platform_machine != 'AMD64'",
        "safetensors",
        "huggingface_hub",
        "tqdm",
        "pyyaml",
    ],
    extras_require={
        # scripts/serve.py: the OpenAI-compatible server
        "serve": ["fastapi", "uvicorn", "prometheus_client"],
        # the tests talk to the real server with the official client, and compare with the qwen-vl-utils
        # release followed (its torch-free functions; torchvision is not needed)
        "test": ["pytest", "torch==2.13.0", "av", "fastapi", "uvicorn", "prometheus_client", "openai", "httpx",
                 "qwen-vl-utils==0.0.14"],
        "convert": ["torch"],
    },
)
