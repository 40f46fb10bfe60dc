"""What the runtimes share, once: configuration, local state (snapshot + journal), push delivery,
the ops HTTP face and its metrics, topic names, logging, the console's lines.

Above the core, below the runtimes; imports no runtime."""
