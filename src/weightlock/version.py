"""The package version (its own module, so that modules inside weightlock can read it without importing the
package root, which imports them)."""
__version__ = "0.1.0"
