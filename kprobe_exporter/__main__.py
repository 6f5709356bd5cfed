from kprobe_exporter.cli import main

raise SystemExit(main())
