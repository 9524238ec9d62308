from nebula.cli.main import main

raise SystemExit(main())
