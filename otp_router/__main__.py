from otp_router.cli import main

raise SystemExit(main())
