"""biollm-cls: continual learning in language models with complementary learning systems."""

__version__ = "0.1.0"
