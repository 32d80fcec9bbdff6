# Installed as /opt/venv/etc/ipython/ipython_kernel_config.py: every IPython kernel started from
# this venv reads it (IPython searches {sys.prefix}/etc/ipython). The extension module's
# load_ipython_extension(ip) puts pmap, imap and executor into the notebook's namespace.
c = get_config()  # noqa: F821 (provided by traitlets when it loads this file)
c.InteractiveShellApp.extensions = ["pyworker.startup"]
