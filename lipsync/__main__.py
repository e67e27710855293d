from lipsync.cli import main


raise SystemExit(main())
